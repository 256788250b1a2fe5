import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { isErrno } from '../../../src/uapi/error.js';

test('mmap of a memfd is shared: across processes, fork and exec, unlike anonymous memory', () => {
  const host = new Host();
  const p = host.spawn();
  const fd = p.memfdCreate(8192);
  const a = p.mmap({ lengthBytes: 8192, fd });
  p.write(a + 10n, Uint8Array.of(7));
  const child = p.fork();
  child.write(a + 11n, Uint8Array.of(8));
  const got = new Uint8Array(2);
  p.read(a + 10n, got);
  assert.deepEqual([...got], [7, 8], 'the child writes into the same file');
  const anon = p.mmap({ lengthBytes: 4096 });
  const child2 = p.fork();
  child2.write(anon, Uint8Array.of(1));
  const a0 = new Uint8Array(1);
  p.read(anon, a0);
  assert.equal(a0[0], 0, 'anonymous memory is copied at fork');
  p.exec();
  const b = p.mmap({ lengthBytes: 4096, fd });
  p.read(b + 10n, got);
  assert.deepEqual([...got], [7, 8], 'the fd survives exec; the new mapping sees the same bytes');
});

test('mmap of a memfd: EBADF, EACCES for a writable mapping of a read-only open, EINVAL past the end', () => {
  const host = new Host();
  const p = host.spawn();
  const fd = p.memfdCreate(4096);
  const is = (errno: string) => (e: unknown) => isErrno(e, errno as never);
  assert.throws(() => p.mmap({ lengthBytes: 4096, fd: 99 }), is('EBADF'));
  assert.throws(() => p.mmap({ lengthBytes: 8192, fd }), is('EINVAL'));
  const ro = p.installFd({ file: p.file(fd)!.file, writable: false });
  assert.throws(() => p.mmap({ lengthBytes: 4096, fd: ro }), is('EACCES'));
  p.mmap({ lengthBytes: 4096, fd: ro, writable: false });
});

test('host module parameters: vfio_iommu_type1.dma_entry_limit defaults to 65535', () => {
  assert.equal(new Host().modules.vfioIommuType1.dmaEntryLimit, 65535);
  assert.equal(
    new Host({ modules: { vfioIommuType1: { dmaEntryLimit: 7 } } }).modules.vfioIommuType1.dmaEntryLimit,
    7,
  );
});
