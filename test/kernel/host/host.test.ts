import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { isErrno } from '../../../src/uapi/error.js';

const GiB = 1024n * 1024n * 1024n;

test('mmap regions are lazily backed, readable and writable', () => {
  const host = new Host();
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 4n * GiB });
  const va = p.mmap({ lengthBytes: 4n * GiB });
  assert.equal(p.mm.regionAt(va)!.store.residentBytes, 0);
  p.write(va + 3n * GiB, new Uint8Array([1, 2, 3]));
  const out = new Uint8Array(4);
  p.read(va + 3n * GiB - 1n, out);
  assert.deepEqual([...out], [0, 1, 2, 3]);
  assert.equal(p.mm.regionAt(va)!.store.residentBytes, 64 * 1024);
  assert.ok(p.mm.covers(va, 4n * GiB, true));
  assert.ok(!p.mm.covers(va, 4n * GiB + 4096n, false));
  assert.throws(
    () => p.read(va - 4096n, out),
    (e) => isErrno(e, 'EFAULT'),
  );
});

test('mmap at a fixed address: EEXIST on overlap, EINVAL misaligned; read-only regions', () => {
  const p = new Host().spawn();
  const va = p.mmap({ lengthBytes: 8192, at: 0x10000n, writable: false });
  assert.equal(va, 0x10000n);
  assert.throws(
    () => p.mmap({ lengthBytes: 4096, at: 0x11000n }),
    (e) => isErrno(e, 'EEXIST'),
  );
  assert.throws(
    () => p.mmap({ lengthBytes: 4096, at: 0x10001n }),
    (e) => isErrno(e, 'EINVAL'),
  );
  assert.throws(
    () => p.write(va, new Uint8Array(1)),
    (e) => isErrno(e, 'EFAULT'),
  );
  assert.ok(!p.mm.covers(va, 4096n, true));
  assert.ok(p.mm.covers(va, 4096n, false));
  p.munmap(va, 8192);
  assert.equal(p.mm.regionAt(va), undefined);
});

test('users are per uid, processes per pid; fork copies memory privately, exec and exit kill the mm', () => {
  const host = new Host();
  const a = host.spawn({ uid: 7, caps: ['CAP_IPC_LOCK'] });
  const b = host.spawn({ uid: 7 });
  assert.equal(a.user, b.user);
  assert.notEqual(a.pid, b.pid);
  assert.equal(host.process(a.pid), a);
  assert.ok(a.hasCap('CAP_IPC_LOCK') && !b.hasCap('CAP_IPC_LOCK'));
  const va = a.mmap({ lengthBytes: 4096 });
  a.write(va, new Uint8Array([9]));
  const fd = a.memfdCreate(8192);
  const child = a.fork();
  assert.equal(child.uid, 7);
  assert.ok(child.hasCap('CAP_IPC_LOCK'));
  child.write(va, new Uint8Array([5]));
  const one = new Uint8Array(1);
  a.read(va, one);
  assert.equal(one[0], 9);
  assert.equal(child.file(fd)!.file, a.file(fd)!.file);
  const oldMm = child.mm;
  child.exec();
  assert.ok(!oldMm.alive);
  assert.notEqual(child.mm, oldMm);
  assert.equal(child.pid, host.process(child.pid)!.pid);
  a.exit();
  assert.ok(!a.mm.alive);
  assert.equal(host.process(a.pid), undefined);
  assert.equal(a.file(fd), undefined);
});

test('memfd: lazily backed, bounded by its size; fds lowest free; EBADF on bad close', () => {
  const p = new Host().spawn();
  const fd = p.memfdCreate(1n << 32n);
  assert.equal(fd, 3);
  const f = p.file(fd)!.file;
  f.write(4096n, new Uint8Array([7]));
  const out = new Uint8Array(2);
  f.read(4095n, out);
  assert.deepEqual([...out], [0, 7]);
  assert.equal(f.store.residentBytes, 64 * 1024);
  assert.throws(
    () => f.read((1n << 32n) - 1n, out),
    (e) => isErrno(e, 'EFAULT'),
  );
  assert.equal(p.memfdCreate(4096), 4);
  p.closeFd(3);
  assert.throws(
    () => p.closeFd(3),
    (e) => isErrno(e, 'EBADF'),
  );
  assert.equal(p.memfdCreate(4096), 3);
});
