import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { NIC_REG } from '../../../src/devices/nic-device.js';
import { Host } from '../../../src/kernel/host/index.js';
import { IommufdBackend } from '../../../src/vmm/machine/iommufd-backend.js';
import { Machine, type MachineState } from '../../../src/vmm/machine/machine.js';
import type { MachineDefinition } from '../../../src/vmm/machine/machine-definition.js';
import { MEDIATED_RECORD_BYTES } from '../../../src/vmm/machine/mediated-device.js';
import { Type1Backend } from '../../../src/vmm/machine/type1-backend.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const PAGE = 4096;

const live: Machine[] = [];
after(async () => {
  await Promise.all(live.map((vm) => vm.destroy().catch(() => undefined)));
});

function create(host: Host, def: MachineDefinition): Machine {
  const vm = Machine.create(host, def);
  live.push(vm);
  return vm;
}

async function waitUntil(what: string, done: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** 1 GiB of RAM, two vCPUs dirtying it, a nic, an accel, a basic device and an mdev. */
function oneGiB(iommu: 'iommufd' | 'type1'): MachineDefinition {
  return {
    name: `vm-${iommu}`,
    iommu,
    ram: [{ name: 'pc.ram', sizeBytes: GiB }],
    vcpus: { count: 2, workload: { dirtyRateMiBps: 32, seed: 7 } },
    devices: [
      {
        type: 'nic',
        name: 'nic0',
        flowTableBytes: 1 << 20,
        rxRing: { entries: 64, bufferBytes: 2048 },
        seed: 3,
      },
      { type: 'accel', name: 'accel0', memoryBytes: 4 * MiB, guestBufferBytes: 64 * 1024, seed: 4 },
      { type: 'basic', name: 'basic0', seed: 5 },
    ],
    emulatedDevices: [{ name: 'mdev0', pages: 2, seed: 6 }],
    guestDriverIntervalMs: 5,
  };
}

for (const iommu of ['iommufd', 'type1'] as const) {
  describe(`a 1 GiB VM on ${iommu}`, () => {
    test('runs, its digest changes as it runs and is stable when stopped; device DMA lands in guest RAM', async () => {
      const host = new Host();
      const vm = create(host, oneGiB(iommu));
      const states: MachineState[] = [];
      vm.onStateChange((s) => states.push(s));
      assert.equal(vm.state, 'created');
      assert.equal(vm.status().ram.mappedBytes, 0);
      const initial = vm.digest();

      await vm.start();
      assert.equal(vm.state, 'running');
      const backend = vm.backend!;
      assert.ok(iommu === 'iommufd' ? backend instanceof IommufdBackend : backend instanceof Type1Backend);
      assert.deepEqual(backend.mappings(), [{ iova: 0n, lengthBytes: BigInt(GiB) }]);
      assert.equal(backend.lockedPages(), GiB / PAGE, 'all of guest RAM pinned for the devices');
      if (backend instanceof IommufdBackend) {
        assert.equal(vm.process.user.lockedVm, GiB / PAGE, "iommufd 'user': the uid pays");
        assert.equal(backend.ctx.deviceIoas(backend.device('nic0').devId)?.id, backend.ioasId);
      } else if (backend instanceof Type1Backend) {
        assert.equal(vm.process.mm.lockedVm, GiB / PAGE, 'type1: the mm pays');
        assert.equal(backend.container.type1!.domainCount, 1);
      }

      await waitUntil('vCPU and device activity', () => {
        const s = vm.status();
        return (
          s.vcpus.bytesWritten > 4 * MiB &&
          s.emulatedDevices[0]!.recordsWritten >= 8 &&
          s.bytesDirtied.deviceDma > 0
        );
      });
      const d1 = vm.digest();
      assert.notEqual(d1, initial);
      await waitUntil('more writes', () => vm.status().vcpus.bytesWritten > 8 * MiB);
      const d2 = vm.digest();
      assert.notEqual(d2, d1, 'the digest moves while the VM runs');

      await vm.stop();
      assert.equal(vm.state, 'stopped');
      const stopped = vm.digest();
      const status = vm.status();
      await sleep(50);
      assert.equal(vm.digest(), stopped, 'stable when stopped');
      assert.deepEqual(vm.status().bytesDirtied, status.bytesDirtied);
      assert.equal(status.vcpus.state, 'paused');
      assert.equal(status.dmaFaults, 0);
      assert.equal(status.ram.mappings, 1, 'devices stay attached and RAM mapped');
      assert.deepEqual(
        status.devices.map((d) => [d.name, d.migrationState]),
        [
          ['nic0', 'RUNNING'],
          ['accel0', 'RUNNING'],
          ['basic0', 'RUNNING'],
        ],
      );
      assert.ok(status.devices[1]!.bytesRead > 0, 'accel read job inputs from guest RAM');

      // The nic's packets are in guest RAM at its ring, as the VMM and the guest (vCPU view) see them.
      const nic = vm.device('nic0');
      const regs = nic.device.driver.image.region('registers');
      const packets = Number(regs.u64(NIC_REG.RX_PACKETS));
      const sent = Number(regs.u64(NIC_REG.TX_PACKETS));
      assert.ok(packets > 0);
      // RX: length word + packet per received packet; TX: a zero length word per buffer given back
      assert.equal(
        status.devices[0]!.bytesWritten,
        Number(regs.u64(NIC_REG.RX_BYTES)) + 4 * packets + 4 * sent,
      );
      // TX: the guest driver posted packets in guest RAM, the nic read them by DMA and sent them
      assert.ok(sent > 0, 'the nic sent packets the guest posted');
      assert.equal(regs.u64(NIC_REG.TX_ERRORS), 0n);
      const inFlight = nic.guestTx!.posted - sent;
      assert.ok(inFlight >= 0 && inFlight <= 256, `posted ${nic.guestTx!.posted}, sent ${sent}`);
      assert.ok(status.devices[0]!.bytesRead >= Number(regs.u64(NIC_REG.TX_BYTES)) + 4 * sent);
      const ring = nic.buffer!;
      const head = new Uint8Array(4);
      vm.ram.read(ring.gpa, head);
      const length = new DataView(head.buffer).getUint32(0, true);
      assert.ok(length >= 60 && length <= 2044, `packet 0 length ${length}`);
      const viaDevice = new Uint8Array(length + 4);
      const viaVmm = new Uint8Array(length + 4);
      const viaGuest = new Uint8Array(
        vm.ram.block('pc.ram').memory.buffers[0]!,
        Number(ring.gpa),
        length + 4,
      );
      backend.deviceSpace('nic0').read(ring.gpa, viaDevice);
      vm.process.read(vm.memfds[0]!.hostVa + ring.gpa, viaVmm);
      assert.deepEqual(viaDevice, viaVmm);
      assert.deepEqual(viaDevice, new Uint8Array(viaGuest));

      // The mdev's records, written through its pins, are guest RAM too.
      const mdev = vm.emulatedDevice('mdev0');
      const records = mdev.status().recordsWritten;
      assert.ok(records >= 8);
      const last = new Uint8Array(8);
      const slot = (records - 1) % ((2 * PAGE) / MEDIATED_RECORD_BYTES);
      vm.ram.read(mdev.iova + BigInt(slot * MEDIATED_RECORD_BYTES), last);
      assert.equal(new DataView(last.buffer).getBigUint64(0, true), BigInt(records - 1));

      // Resume: it moves again.
      await vm.start();
      assert.equal(vm.state, 'running');
      await waitUntil(
        'writes after resume',
        () => vm.status().vcpus.bytesWritten > status.vcpus.bytesWritten,
      );
      assert.notEqual(vm.digest(), stopped);
      await vm.stop();

      await vm.destroy();
      assert.equal(vm.state, 'destroyed');
      assert.deepEqual(states, ['starting', 'running', 'stopped', 'running', 'stopped', 'destroyed']);
      assert.equal(vm.process.alive, false);
      assert.equal(vm.process.user.lockedVm, 0);
      assert.equal(vm.process.mm.lockedVm, 0);
      assert.equal(host.rootCgroup.pinnedPages, 0);
    });
  });
}

test('the VM digest is guest RAM plus every device digest, sorted by name', async () => {
  const def = (names: string[]): MachineDefinition => ({
    name: 'digest',
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: 4 * MiB }],
    vcpus: { count: 1 },
    devices: names.map((name) => ({ type: 'basic' as const, name, seed: name.length })),
  });
  const a = create(new Host(), def(['b1', 'a22']));
  const b = create(new Host(), def(['a22', 'b1']));
  assert.equal(a.digest(), b.digest(), 'device order in the definition does not matter');
  const c = create(new Host(), def(['a22', 'b1', 'c333']));
  assert.notEqual(a.digest(), c.digest());
  a.device('b1').device.work(1);
  assert.notEqual(a.digest(), b.digest(), 'a device state change changes it');
  b.device('b1').device.work(1);
  assert.equal(a.digest(), b.digest());
  a.ram.write(8192n, Uint8Array.of(1));
  assert.notEqual(a.digest(), b.digest(), 'a RAM change changes it');
});
