import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { RLIM_INFINITY } from '../../../src/kernel/host/host.js';
import { formatBytes, parseByteValue } from '../../../src/vmm/host/sizes.js';
import {
  formatJsonPath,
  parseVmDefinition,
  VmDefinitionError,
  vmFootprintBytes,
} from '../../../src/vmm/host/vm-definition.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const EXAMPLE = new URL('../../../../examples/vm-1g.json', import.meta.url);

const minimal = {
  name: 'vm',
  iommu: 'iommufd',
  ram: [{ name: 'pc.ram', sizeBytes: '64MiB' }],
  vcpus: { count: 1 },
};

/** The issues parseVmDefinition reports for `input`, as [path, message] pairs. */
function issues(input: unknown): [string, string][] {
  try {
    parseVmDefinition(input);
  } catch (err) {
    assert.ok(err instanceof VmDefinitionError, String(err));
    assert.equal(err.code, 'ERR_VM_DEFINITION');
    return err.issues.map((i) => [i.path, i.message]);
  }
  assert.fail('the definition was accepted');
}

describe('sizes', () => {
  test('numbers, unit strings, decimal and hex strings; nothing else', () => {
    assert.equal(parseByteValue(4096), 4096n);
    assert.equal(parseByteValue('1GiB'), BigInt(GiB));
    assert.equal(parseByteValue('512 MiB'), 512n * BigInt(MiB));
    assert.equal(parseByteValue('4KiB'), 4096n);
    assert.equal(parseByteValue('2TiB'), 2n << 40n);
    assert.equal(parseByteValue('0x100000000'), 1n << 32n);
    assert.equal(parseByteValue('18446744073709551615'), (1n << 64n) - 1n);
    for (const bad of [
      -1,
      1.5,
      2 ** 53,
      '1 GB',
      '1gib',
      '-4KiB',
      '1.5GiB',
      '',
      ' 1',
      '0x',
      'x'.repeat(100),
      null,
      {},
    ]) {
      assert.equal(parseByteValue(bad), undefined, JSON.stringify(bad));
    }
    assert.equal(formatBytes(GiB), '1 GiB');
    assert.equal(formatBytes(1536 * 1024), '1.5 MiB');
    assert.equal(formatBytes('4096'), '4 KiB');
    assert.equal(formatBytes(100), '100 B');
  });

  test('JSON paths', () => {
    assert.equal(formatJsonPath([]), '$');
    assert.equal(formatJsonPath(['ram', 0, 'sizeBytes']), '$.ram[0].sizeBytes');
    assert.equal(formatJsonPath(['odd key']), '$["odd key"]');
  });
});

describe('VM definition JSON', () => {
  test('the shipped example: 1 GiB, two dirtying vCPUs, nic + accel + basic on iommufd', () => {
    const def = parseVmDefinition(JSON.parse(readFileSync(EXAMPLE, 'utf8')));
    assert.equal(def.name, 'vm-1g');
    assert.equal(def.iommu, 'iommufd');
    assert.equal(def.accounting, 'user');
    assert.equal(def.memlockLimitBytes, 2n * BigInt(GiB));
    assert.deepEqual(def.ram, [{ name: 'pc.ram', sizeBytes: GiB }]);
    assert.equal(def.vcpus.count, 2);
    assert.deepEqual(def.vcpus.workload, { dirtyRateMiBps: 64, pattern: { kind: 'random' }, seed: 7 });
    assert.deepEqual(
      def.devices!.map((d) => [d.type, d.name]),
      [
        ['nic', 'nic0'],
        ['accel', 'accel0'],
        ['basic', 'basic0'],
      ],
    );
    const accel = def.devices![1]!;
    assert.ok(accel.type === 'accel' && accel.memoryBytes === 16 * MiB && accel.guestBufferBytes === 65536);
    assert.equal(vmFootprintBytes(def), GiB + MiB + 64 * 1024 + 4096 + 16 * MiB + 4096 + 4096);
  });

  test('sizes and 64-bit values in every form; absent options stay absent', () => {
    const def = parseVmDefinition({
      ...minimal,
      ram: [
        { name: 'pc.ram', sizeBytes: 64 * MiB },
        {
          name: 'vmem0',
          sizeBytes: '256MiB',
          gpa: '0x100000000',
          discard: { blockSizeBytes: '2MiB', plugged: 'all' },
        },
      ],
      memlockLimitBytes: 'unlimited',
      vcpus: {
        count: 2,
        workload: [{ pattern: { kind: 'hot', hotFraction: 0.1 } }, { workingSetBytes: '1MiB' }],
      },
      emulatedDevices: [{ name: 'mdev0', pages: 2 }],
    });
    assert.deepEqual(def.ram[1], {
      name: 'vmem0',
      sizeBytes: 256 * MiB,
      gpa: 1n << 32n,
      discard: { blockSizeBytes: 2 * MiB, plugged: 'all' },
    });
    assert.equal(def.memlockLimitBytes, RLIM_INFINITY);
    assert.equal('accounting' in def, false);
    assert.equal(
      parseVmDefinition({ ...minimal, memlockLimitBytes: '18446744073709551615' }).memlockLimitBytes,
      RLIM_INFINITY,
    );
  });

  test('schema violations are listed with their JSON paths', () => {
    const found = issues({
      name: '../etc',
      iommu: 'vfio',
      ram: [
        { name: 'pc.ram', sizeBytes: '1 GB' },
        { name: 'b', sizeBytes: 4097 },
      ],
      vcpus: { count: 0, workload: { dirtyRateMiBps: -1, seed: 2 ** 32 } },
      devices: [
        { type: 'nic', name: 'nic0', rxRing: { entries: 0, bufferBytes: 64 } },
        { type: 'gpu', name: 'g' },
        { type: 'basic', name: 'basic0', colour: 'red' },
      ],
      memlockLimitBytes: -5,
      uid: 2 ** 32,
      extra: true,
    });
    const paths = found.map(([p]) => p);
    for (const path of [
      '$.name',
      '$.iommu',
      '$.ram[0].sizeBytes',
      '$.ram[1].sizeBytes',
      '$.vcpus.count',
      '$.vcpus.workload.dirtyRateMiBps',
      '$.vcpus.workload.seed',
      '$.devices[0].rxRing.entries',
      '$.devices[0].rxRing.bufferBytes',
      '$.devices[1].type',
      '$.devices[2]',
      '$.memlockLimitBytes',
      '$.uid',
      '$',
    ]) {
      assert.ok(paths.includes(path), `${path} in ${JSON.stringify(found, null, 1)}`);
    }
    const message = (path: string) => found.find(([p]) => p === path)![1];
    assert.match(message('$.ram[0].sizeBytes'), /"1 GB" is not a byte count/);
    assert.match(message('$.ram[1].sizeBytes'), /must be from 4096 to \d+, a multiple of 4096/);
    assert.match(message('$.devices[2]'), /colour/);
    assert.match(message('$'), /extra/);
  });

  test('not an object at all, or missing what is required', () => {
    assert.deepEqual(issues('vm'), [['$', 'Invalid input: expected object, received string']]);
    const paths = issues({}).map(([p]) => p);
    assert.deepEqual(paths.sort(), ['$.iommu', '$.name', '$.ram', '$.vcpus']);
  });

  test('rules across fields: unique names, boot block, block size, workload count, type1 accounting', () => {
    const found = issues({
      ...minimal,
      iommu: 'type1',
      accounting: 'user',
      ram: [
        { name: 'pc.ram', sizeBytes: '64MiB', discard: { blockSizeBytes: '2MiB' } },
        { name: 'pc.ram', sizeBytes: '3MiB', gpa: '0x100001000', discard: { blockSizeBytes: '2MiB' } },
      ],
      vcpus: { count: 2, workload: [{}] },
      devices: [
        { type: 'basic', name: 'd' },
        { type: 'nic', name: 'd' },
      ],
      emulatedDevices: [{ name: 'd' }],
    });
    assert.deepEqual(
      found.map(([p]) => p),
      [
        '$.ram[1].name',
        '$.devices[1].name',
        '$.emulatedDevices[0].name',
        '$.ram[0].discard',
        '$.ram[1].discard.blockSizeBytes',
        '$.ram[1].gpa',
        '$.vcpus.workload',
        '$.accounting',
      ],
    );
  });

  test("the machine's own checks: buffers beyond the boot block, a working set beyond RAM", () => {
    assert.match(
      issues({
        ...minimal,
        ram: [{ name: 'pc.ram', sizeBytes: '64KiB' }],
        devices: [{ type: 'accel', name: 'a', guestBufferBytes: '64KiB' }],
      })[0]![1],
      /device buffers take 65536 bytes, more than the boot block/,
    );
    assert.deepEqual(
      issues({ ...minimal, vcpus: { count: 1, workload: { workingSetOffsetBytes: '64MiB' } } }),
      [
        [
          '$.vcpus.workload',
          'working set offset 67108864 is not a 4 KiB aligned offset inside 67108864 bytes of RAM',
        ],
      ],
    );
  });

  test('bounded: too many devices, vCPUs, a 2 TiB block', () => {
    const many = Array.from({ length: 33 }, (_, i) => ({ type: 'basic', name: `b${i}` }));
    const paths = issues({
      ...minimal,
      devices: many,
      vcpus: { count: 33 },
      ram: [{ name: 'pc.ram', sizeBytes: '2TiB' }],
    }).map(([p]) => p);
    assert.deepEqual(paths.sort(), ['$.devices', '$.ram[0].sizeBytes', '$.vcpus.count']);
  });
});

describe('docs/VM-DEFINITION.md', () => {
  const doc = readFileSync(new URL('../../../../docs/VM-DEFINITION.md', import.meta.url), 'utf8');
  const blocks = [...doc.matchAll(/```json\n([\s\S]*?)```/g)].map((m) => JSON.parse(m[1]!) as unknown);

  test('every JSON example is a valid definition; the first is examples/vm-1g.json', () => {
    assert.equal(blocks.length, 2);
    for (const block of blocks) parseVmDefinition(block);
    assert.deepEqual(blocks[0], JSON.parse(readFileSync(EXAMPLE, 'utf8')));
  });

  test('the schema violations it shows are the ones reported', () => {
    const found = issues({
      name: 'bad',
      iommu: 'iommufd',
      ram: [{ name: 'pc.ram', sizeBytes: '1 GB' }],
      vcpus: { count: 0 },
    });
    for (const [path, message] of found)
      assert.ok(doc.includes(`${path}: ${message}`), `${path}: ${message}`);
  });
});
