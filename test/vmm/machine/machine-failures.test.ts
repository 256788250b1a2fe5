import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Host } from '../../../src/kernel/host/index.js';
import { Machine } from '../../../src/vmm/machine/machine.js';
import type { AccountingMode } from '../../../src/vmm/machine/machine-errors.js';
import type { MachineDefinition } from '../../../src/vmm/machine/machine-definition.js';
import { DmaMappingLimitError, GuestRamPinError } from '../../../src/vmm/machine/machine-errors.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const VMEM_GPA = 1n << 32n;

const live: Machine[] = [];
after(async () => {
  await Promise.all(live.map((vm) => vm.destroy().catch(() => undefined)));
});

function create(host: Host, def: MachineDefinition): Machine {
  const vm = Machine.create(host, def);
  live.push(vm);
  return vm;
}

/** Nothing of the VM is mapped, pinned or charged anywhere. */
function assertNothingHeld(host: Host, vm: Machine): void {
  const s = vm.status();
  assert.equal(vm.backend, undefined, 'the backend fds are closed');
  assert.equal(s.ram.mappedBytes, 0);
  assert.equal(s.ram.mappings, 0);
  assert.equal(s.lockedPages, 0);
  assert.equal(vm.process.user.lockedVm, 0, 'uid locked_vm');
  assert.equal(vm.process.mm.lockedVm, 0, 'mm locked_vm');
  assert.equal(vm.process.mm.pinnedVm, 0, 'mm pinned_vm');
  assert.equal(host.rootCgroup.pinnedPages, 0, 'cgroup pinned');
  assert.equal(s.vcpus.state, 'none', 'no vCPU thread was started');
  for (const d of vm.devices) assert.throws(() => d.dma.write(0n, Uint8Array.of(1)), { code: 'DMA_FAULT' });
}

/** Boot RAM and a virtio-mem-like region of `blocks` blocks, one nic. */
function withVmem(iommu: 'iommufd' | 'type1', blockSizeBytes: number, vmemBytes: number): MachineDefinition {
  return {
    name: `vmem-${iommu}`,
    iommu,
    ram: [
      { name: 'pc.ram', sizeBytes: 64 * MiB },
      { name: 'vmem0', sizeBytes: vmemBytes, gpa: VMEM_GPA, discard: { blockSizeBytes } },
    ],
    vcpus: { count: 2, workload: { dirtyRateMiBps: 16 } },
    devices: [
      { type: 'nic', name: 'nic0', flowTableBytes: 1 << 16, rxRing: { entries: 16, bufferBytes: 2048 } },
    ],
  };
}

describe('the DMA mapping limit, end to end', () => {
  test('type1 with a discardable region of 4 KiB blocks is refused at start with the numbers and the remedy', async () => {
    const host = new Host();
    const vm = create(host, withVmem('type1', PAGE, 512 * MiB));
    await assert.rejects(vm.start(), (err: unknown) => {
      assert.ok(err instanceof DmaMappingLimitError, String(err));
      assert.deepEqual(err.estimate, {
        mappings: 131072 + 512 - 1,
        discardBlocks: 131072,
        discardSections: 1,
        maxMemslots: 512,
      });
      assert.equal(err.limit, 65535);
      assert.equal(err.limitReported, true, 'type1 reports DMA_AVAIL');
      assert.equal(err.target, 'vmem-type1');
      assert.equal(err.op, 'VM start');
      for (const part of ['131583', '65535', 'block size', 'dma_entry_limit', 'iommufd']) {
        assert.ok(err.message.includes(part), `${part} in: ${err.message}`);
      }
      return true;
    });
    assert.equal(vm.state, 'failed');
    assert.ok(vm.error instanceof DmaMappingLimitError);
    assertNothingHeld(host, vm);
    assert.equal(vm.status().error?.code, 'ERR_DMA_MAPPING_LIMIT');
    await vm.destroy();
  });

  test('the same VM with a larger block size starts on type1', async () => {
    const host = new Host();
    const vm = create(host, withVmem('type1', 2 * MiB, 512 * MiB));
    await vm.start();
    await vm.plug('vmem0', 0, 4);
    assert.equal(vm.backend!.mappings().length, 1 + 4);
    await vm.destroy();
  });

  test('the same VM on iommufd starts: no count limit; plugs map and unplugs unmap 4 KiB blocks', async () => {
    const host = new Host();
    const vm = create(host, withVmem('iommufd', PAGE, 512 * MiB));
    await vm.start();
    assert.equal(vm.backend!.mappingLimit, undefined);
    assert.deepEqual(vm.backend!.mappings(), [{ iova: 0n, lengthBytes: BigInt(64 * MiB) }]);
    await vm.plug('vmem0', 100, 64);
    const areas = vm.backend!.mappings();
    assert.equal(areas.length, 65);
    assert.deepEqual(areas[1], { iova: VMEM_GPA + 100n * BigInt(PAGE), lengthBytes: BigInt(PAGE) });
    assert.equal(vm.status().ram.mappedBytes, 64 * MiB + 64 * PAGE);
    assert.equal(vm.status().ram.blocks[1]!.pluggedBytes, 64 * PAGE);
    await vm.unplug('vmem0', 110, 10);
    assert.equal(vm.backend!.mappings().length, 55);
    assert.ok(
      vm
        .backend!.mappings()
        .every((m) => m.iova < VMEM_GPA + 110n * 4096n || m.iova >= VMEM_GPA + 120n * 4096n),
    );
    assert.equal(vm.state, 'running');
    await vm.destroy();
    assert.equal(vm.process.user.lockedVm, 0);
  });
});

describe('pinned-page accounting, end to end', () => {
  const cases: { iommu: 'iommufd' | 'type1'; accounting: AccountingMode; charged: string }[] = [
    { iommu: 'iommufd', accounting: 'user', charged: "uid 107's locked_vm" },
    { iommu: 'iommufd', accounting: 'mm', charged: 'mm locked_vm' },
    { iommu: 'type1', accounting: 'mm', charged: 'mm locked_vm' },
  ];
  for (const { iommu, accounting, charged } of cases) {
    test(`${iommu}, accounting '${accounting}': RLIMIT_MEMLOCK too small for the RAM refuses the start and holds nothing`, async () => {
      const host = new Host();
      // The first block fits under the limit and is mapped, the second does not: both must be gone after.
      const vm = create(host, {
        name: 'small-memlock',
        iommu,
        accounting,
        memlockLimitBytes: BigInt(128 * MiB),
        ram: [
          { name: 'pc.ram', sizeBytes: 96 * MiB },
          { name: 'pc.ram.high', sizeBytes: 64 * MiB, gpa: VMEM_GPA },
        ],
        vcpus: { count: 1 },
        devices: [{ type: 'accel', name: 'accel0', memoryBytes: 1 * MiB }],
        emulatedDevices: [{ name: 'mdev0' }],
      });
      await assert.rejects(vm.start(), (err: unknown) => {
        assert.ok(err instanceof GuestRamPinError, String(err));
        assert.equal(err.code, 'ERR_GUEST_RAM_PIN');
        assert.equal(err.accountingMode, accounting);
        assert.equal(err.backend, iommu);
        assert.equal(err.memlockLimitBytes, BigInt(128 * MiB));
        assert.deepEqual(err.limit, { kind: 'RLIMIT_MEMLOCK', bytes: BigInt(128 * MiB) });
        assert.equal(
          err.lockedPages,
          (96 * MiB) / PAGE,
          'the first block was charged when the second failed',
        );
        assert.deepEqual(err.section, {
          ramBlock: 'pc.ram.high',
          iova: VMEM_GPA,
          lengthBytes: BigInt(64 * MiB),
        });
        assert.equal((err.cause as { errno?: string }).errno, 'ENOMEM');
        assert.equal(err.op, 'VM start');
        for (const part of [
          `accounting mode '${accounting}'`,
          charged,
          'RLIMIT_MEMLOCK 128 MiB',
          'CAP_IPC_LOCK',
        ]) {
          assert.ok(err.message.includes(part), `${part} in: ${err.message}`);
        }
        return true;
      });
      assert.equal(vm.state, 'failed');
      assertNothingHeld(host, vm);
      await vm.destroy();
      assert.equal(vm.process.alive, false);
    });
  }

  test('a cgroup pinned.max too small refuses the start naming that cgroup', async () => {
    const host = new Host();
    host.rootCgroup.mkdir('machine', { pinnedLimitBytes: BigInt(64 * MiB) }).mkdir('vm1');
    const vm = create(host, {
      name: 'capped',
      iommu: 'iommufd',
      cgroup: '/machine/vm1',
      ram: [{ name: 'pc.ram', sizeBytes: 96 * MiB }],
      vcpus: { count: 1 },
      devices: [{ type: 'basic', name: 'basic0' }],
    });
    await assert.rejects(vm.start(), (err: unknown) => {
      assert.ok(err instanceof GuestRamPinError, String(err));
      assert.deepEqual(err.limit, { kind: 'pinned.max', bytes: BigInt(64 * MiB), cgroup: '/machine' });
      assert.equal(err.accountingMode, 'user');
      assert.match(err.message, /pinned\.max of cgroup \/machine \(64 MiB\)/);
      return true;
    });
    assertNothingHeld(host, vm);
    assert.equal(host.cgroup('/machine').pinnedMaxEvents, 1);
  });

  test("accounting 'none' (CAP_IPC_LOCK): the same VM starts under the same limit; cgroups still count", async () => {
    const host = new Host();
    host.rootCgroup.mkdir('machine');
    const vm = create(host, {
      name: 'ipc-lock',
      iommu: 'iommufd',
      accounting: 'none',
      memlockLimitBytes: BigInt(128 * MiB),
      cgroup: '/machine',
      ram: [{ name: 'pc.ram', sizeBytes: 160 * MiB }],
      vcpus: { count: 1 },
      devices: [{ type: 'basic', name: 'basic0' }],
    });
    await vm.start();
    assert.equal(vm.process.hasCap('CAP_IPC_LOCK'), true);
    assert.equal(vm.status().lockedPages, 0);
    assert.equal(vm.process.user.lockedVm, 0);
    assert.equal(host.cgroup('/machine').pinnedPages, (160 * MiB) / PAGE);
    await vm.destroy();
    assert.equal(host.cgroup('/machine').pinnedPages, 0);
  });
});

describe('a mapping failure while running stops the VM', () => {
  for (const iommu of ['iommufd', 'type1'] as const) {
    test(`${iommu}: a plug beyond RLIMIT_MEMLOCK is refused and the VM stops with the error`, async () => {
      const host = new Host();
      const vm = create(host, { ...withVmem(iommu, 2 * MiB, 64 * MiB), memlockLimitBytes: BigInt(68 * MiB) });
      await vm.start();
      await vm.plug('vmem0', 0, 2); // 64 + 4 MiB: at the limit
      await sleep(20);
      await assert.rejects(vm.plug('vmem0', 2), (err: unknown) => {
        assert.ok(err instanceof GuestRamPinError, String(err));
        assert.equal(err.op, 'memory plug');
        assert.deepEqual(err.section, {
          ramBlock: 'vmem0',
          iova: VMEM_GPA + BigInt(4 * MiB),
          lengthBytes: BigInt(2 * MiB),
        });
        return true;
      });
      assert.equal(vm.state, 'failed');
      assert.ok(vm.error instanceof GuestRamPinError);
      assert.equal(vm.ram.block('vmem0').discard!.isPlugged(2), false, 'the plug was refused');
      assert.equal(vm.status().vcpus.state, 'paused', 'vCPUs stopped');
      assert.equal(vm.backend!.mappings().length, 3, 'what was mapped stays for inspection');
      const digest = vm.digest();
      await sleep(30);
      assert.equal(vm.digest(), digest, 'nothing runs any more');
      await assert.rejects(vm.stop(), { code: 'ERR_INVALID_ARGUMENT' });
      await assert.rejects(vm.start(), { code: 'ERR_INVALID_ARGUMENT' });
      await vm.destroy();
      assert.equal(vm.process.mm.lockedVm + vm.process.user.lockedVm, 0);
    });
  }
});

test('a device whose work throws (not a DMA fault) stops the VM with the error', async () => {
  const host = new Host();
  const vm = create(host, {
    name: 'broken-device',
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: 16 * MiB }],
    vcpus: { count: 1, workload: { dirtyRateMiBps: 8 } },
    devices: [{ type: 'basic', name: 'basic0' }],
    guestDriverIntervalMs: 2,
  });
  await vm.start();
  const failed = new Promise<unknown>((resolve) =>
    vm.onStateChange((state, err) => state === 'failed' && resolve(err)),
  );
  vm.device('basic0').device.work = () => {
    throw new Error('firmware crashed');
  };
  const keepAlive = setInterval(() => {}, 1000); // the VM's timers and threads do not hold the loop
  const err = await failed;
  clearInterval(keepAlive);
  assert.equal((err as { code?: string }).code, 'ERR_MACHINE_FAILED');
  assert.match(String((err as Error).message), /device basic0 failed: firmware crashed/);
  assert.equal(vm.state, 'failed');
  await vm.destroy();
  assert.equal(vm.status().vcpus.state, 'terminated');
});
