import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  DEFAULT_NIC_RING,
  type MachineDefinition,
  resolveMachineDefinition,
} from '../../../src/vmm/machine/machine-definition.js';

const MiB = 1024 * 1024;
const bad = { code: 'ERR_INVALID_ARGUMENT' };
const base: MachineDefinition = {
  name: 'vm',
  iommu: 'iommufd',
  ram: [{ name: 'pc.ram', sizeBytes: 64 * MiB }],
  vcpus: { count: 2 },
};

test('defaults: packed GPAs, per-backend accounting, memlock = RAM + 1 GiB, libvirt uid', () => {
  const r = resolveMachineDefinition({
    ...base,
    ram: [
      { name: 'pc.ram', sizeBytes: 3 * MiB },
      { name: 'vmem0', sizeBytes: 8 * MiB, discard: { blockSizeBytes: 2 * MiB } },
      { name: 'hi', sizeBytes: MiB, gpa: 1n << 32n },
    ],
  });
  assert.deepEqual(
    r.ram.map((b) => b.gpa),
    [0n, 4n * BigInt(MiB), 1n << 32n],
    'the discardable region is aligned to its block size',
  );
  assert.equal(r.accounting, 'user');
  assert.equal(resolveMachineDefinition({ ...base, iommu: 'type1' }).accounting, 'mm');
  assert.equal(r.memlockLimitBytes, BigInt(12 * MiB) + (1n << 30n));
  assert.equal(r.uid, 107);
  assert.equal(r.guestDriverIntervalMs, 10);
  assert.equal(r.maxMemslots, 512);
});

test('device buffers are placed at the start of boot RAM; default vCPU working sets skip them', () => {
  const r = resolveMachineDefinition({
    ...base,
    vcpus: {
      count: 2,
      workload: [{ dirtyRateMiBps: 1 }, { workingSetOffsetBytes: 0, workingSetBytes: 4096 }],
    },
    devices: [
      { type: 'basic', name: 'b' },
      { type: 'nic', name: 'n' },
      { type: 'accel', name: 'a', guestBufferBytes: 10_000 },
    ],
    emulatedDevices: [{ name: 'm', pages: 3 }],
  });
  // the nic has an RX and a TX ring of the same geometry
  const ring = 2 * DEFAULT_NIC_RING.entries * DEFAULT_NIC_RING.bufferBytes;
  assert.deepEqual(
    [...r.buffers.values()],
    [
      { device: 'n', gpa: 0n, bytes: ring },
      { device: 'a', gpa: BigInt(ring), bytes: 10_000 },
      { device: 'm', gpa: BigInt(ring + 12_288), bytes: 3 * 4096 },
    ],
  );
  assert.equal(r.bufferAreaBytes, ring + 12_288 + 3 * 4096);
  assert.deepEqual(r.vcpuWorkload[0], {
    dirtyRateMiBps: 1,
    workingSetOffsetBytes: r.bufferAreaBytes,
    workingSetBytes: 64 * MiB - r.bufferAreaBytes,
  });
  assert.deepEqual(
    r.vcpuWorkload[1],
    { workingSetOffsetBytes: 0, workingSetBytes: 4096 },
    'given ones are kept',
  );
});

test('bad definitions are refused', () => {
  const cases: [string, MachineDefinition][] = [
    ['no name', { ...base, name: '' }],
    ['unknown backend', { ...base, iommu: 'vfio' as 'type1' }],
    ['type1 with per-user accounting', { ...base, iommu: 'type1', accounting: 'user' }],
    ['unknown accounting', { ...base, accounting: 'cgroup' as 'mm' }],
    ['no RAM', { ...base, ram: [] }],
    [
      'discardable boot RAM',
      { ...base, ram: [{ name: 'r', sizeBytes: MiB, discard: { blockSizeBytes: MiB } }] },
    ],
    [
      'two devices of one name',
      { ...base, devices: [{ type: 'basic', name: 'x' }], emulatedDevices: [{ name: 'x' }] },
    ],
    ['unknown device type', { ...base, devices: [{ type: 'gpu' as 'basic', name: 'g' }] }],
    ['negative work units', { ...base, devices: [{ type: 'basic', name: 'b', workUnitsPerTick: -1 }] }],
    [
      'buffers larger than boot RAM',
      { ...base, devices: [{ type: 'accel', name: 'a', guestBufferBytes: 64 * MiB }] },
    ],
    ['no vCPU', { ...base, vcpus: { count: 0 } }],
    ['workloads for the wrong number of vCPUs', { ...base, vcpus: { count: 2, workload: [{}] } }],
    ['zero memory slots', { ...base, maxMemslots: 0 }],
  ];
  for (const [what, def] of cases) assert.throws(() => resolveMachineDefinition(def), bad, what);
});
