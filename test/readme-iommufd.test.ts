import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createNicDevice, DmaPort, Host, IoasDmaSpace, IommufdContext, NIC_REG } from '../src/index.js';

// The README's iommufd example, through the package root, as written there.
test('README example: a nic attached to an IOAS receives packets into the VMM process memory', () => {
  const host = new Host();
  const vmm = host.spawn({ uid: 107, rlimitMemlockBytes: 1n << 30n });
  const ram = vmm.mmap({ lengthBytes: 64n << 20n });
  const ctx = IommufdContext.open(vmm);
  const { outIoasId } = ctx.ioasAlloc();
  ctx.ioasMap({ ioasId: outIoasId, flags: 1 | 2 | 4, userVa: ram, length: 64n << 20n, iova: 0n });
  const { outDevid } = ctx.bindDevice({ name: 'nic0' });
  ctx.attachIoas({ devId: outDevid, ptId: outIoasId });
  assert.equal(
    vmm.mm.lockedVm + host.user(107).lockedVm,
    (64 << 20) / 4096,
    'every page pinned and charged once',
  );
  const nic = createNicDevice({
    dma: new DmaPort(new IoasDmaSpace(ctx, outDevid)),
    rxRing: { iova: 0x10000n, entries: 64, bufferBytes: 2048 },
  });
  nic.work(10);
  const head = new Uint8Array(4);
  vmm.read(ram + 0x10000n, head);
  const packetLength = new DataView(head.buffer).getUint32(0, true);
  assert.ok(packetLength > 0, 'the first RX buffer holds a packet in the process memory');
  const regs = nic.driver.image.region('registers');
  assert.ok(regs.u64(NIC_REG.RX_PACKETS) > 0n);
});
