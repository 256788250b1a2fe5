import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DmaFault, DmaPort, MemoryDmaSpace } from '../../../src/kernel/vfio/dma-port.js';
import { VfioError } from '../../../src/uapi/error.js';

const isFault = (iova: bigint, access: 'read' | 'write') => (e: unknown) =>
  e instanceof DmaFault &&
  e instanceof VfioError &&
  e.code === 'DMA_FAULT' &&
  e.iova === iova &&
  e.access === access;

test('MemoryDmaSpace: IOVA base + i is byte i; anything outside faults', () => {
  const bytes = new Uint8Array(16);
  const port = new DmaPort(new MemoryDmaSpace(bytes, { base: 0x1000n }));
  port.write(0x1004n, Uint8Array.of(1, 2, 3));
  assert.deepEqual([...bytes.subarray(3, 8)], [0, 1, 2, 3, 0]);
  const got = new Uint8Array(4);
  port.read(0x1003n, got);
  assert.deepEqual([...got], [0, 1, 2, 3]);
  port.write(0x100fn, Uint8Array.of(9)); // last byte
  assert.throws(() => port.write(0x100fn, Uint8Array.of(9, 9)), isFault(0x100fn, 'write'));
  assert.throws(() => port.read(0xfffn, new Uint8Array(1)), isFault(0xfffn, 'read'));
  assert.throws(() => port.read(0x1010n, new Uint8Array(1)), isFault(0x1010n, 'read'));
  assert.equal(bytes[15], 9);
});

test('a read-only space faults writes and still serves reads', () => {
  const bytes = Uint8Array.of(5, 6);
  const port = new DmaPort(new MemoryDmaSpace(bytes, { writable: false }));
  assert.throws(() => port.write(0n, Uint8Array.of(1)), isFault(0n, 'write'));
  assert.deepEqual([...bytes], [5, 6]);
  const got = new Uint8Array(2);
  port.read(0n, got);
  assert.deepEqual([...got], [5, 6]);
});

test('observers see successful writes only, until they unsubscribe; rebind moves the port', () => {
  const a = new Uint8Array(8);
  const b = new Uint8Array(8);
  const port = new DmaPort(new MemoryDmaSpace(a));
  const seen: [bigint, number][] = [];
  const stop = port.observeWrites((iova, len) => seen.push([iova, len]));
  port.write(2n, Uint8Array.of(1, 1));
  port.read(0n, new Uint8Array(8));
  assert.throws(() => port.write(7n, Uint8Array.of(1, 1)));
  port.rebind(new MemoryDmaSpace(b));
  port.write(0n, Uint8Array.of(7));
  stop();
  port.write(1n, Uint8Array.of(8));
  assert.deepEqual(seen, [
    [2n, 2],
    [0n, 1],
  ]);
  assert.deepEqual([...a], [0, 0, 1, 1, 0, 0, 0, 0]);
  assert.deepEqual([...b], [7, 8, 0, 0, 0, 0, 0, 0]);
});
