import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host, LazyBytes, MemFile, PhysMemoryStore } from '../../../src/kernel/host/index.js';
import { PhysMemory } from '../../../src/kernel/mem/phys-memory.js';
import { isErrno } from '../../../src/uapi/error.js';

const PAGE = 4096;

test('a memfd backed by a PhysMemory: its bytes are the PhysMemory, through every mapping and fork', () => {
  const host = new Host();
  const p = host.spawn();
  const memory = new PhysMemory(4 * PAGE);
  const fd = p.memfdCreate(4 * PAGE, 'guest-ram', { memory });
  const file = p.file(fd)!.file;
  assert.ok(file.store instanceof PhysMemoryStore);
  assert.equal((file.store as PhysMemoryStore).memory, memory);
  const va = p.mmap({ lengthBytes: 4 * PAGE, fd });
  // A process write lands in the PhysMemory's shared buffer…
  p.write(va + 5000n, Uint8Array.of(1, 2, 3));
  assert.deepEqual([...new Uint8Array(memory.buffers[0]!, 5000, 3)], [1, 2, 3]);
  // …and a write to the buffer (as a worker thread holding it makes) is what the process reads.
  new Uint8Array(memory.buffers[0]!)[PAGE * 3] = 9;
  const got = new Uint8Array(1);
  p.read(va + BigInt(PAGE * 3), got);
  assert.equal(got[0], 9);
  // pread, a forked child's mapping and a second mapping all see the same bytes.
  const viaFile = new Uint8Array(3);
  file.read(5000n, viaFile);
  assert.deepEqual([...viaFile], [1, 2, 3]);
  const child = p.fork();
  child.write(va + 6000n, Uint8Array.of(7));
  assert.equal(memory.view(6000, 1)[0], 7);
  const again = p.mmap({ lengthBytes: 2 * PAGE, fd });
  p.read(again + 5000n, viaFile);
  assert.deepEqual([...viaFile], [1, 2, 3]);
  assert.equal(file.store.residentBytes, 4 * PAGE, 'a PhysMemory is resident as a whole');
});

test('a PhysMemory-backed memfd must have the memory size; lazily backed memfds are unchanged', () => {
  const p = new Host().spawn();
  assert.throws(
    () => p.memfdCreate(8192, 'x', { memory: new PhysMemory(4096) }),
    (e: unknown) => isErrno(e, 'EINVAL'),
  );
  const lazy = new MemFile(1n << 32n);
  assert.ok(lazy.store instanceof LazyBytes);
  assert.equal(lazy.store.residentBytes, 0);
  lazy.write(1n << 31n, Uint8Array.of(1));
  assert.equal(lazy.store.residentBytes, 64 * 1024);
});
