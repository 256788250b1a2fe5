import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { test } from 'node:test';
import { PhysMemory, SEGMENT_BYTES } from '../../../src/kernel/mem/phys-memory.js';

function randomMemory(size: number): PhysMemory {
  const m = new PhysMemory(size);
  randomFillSync(m.view(0, size));
  return m;
}

test('read and write round-trip bytes and a fresh memory is zero', () => {
  const m = new PhysMemory(3 * 65536 + 17);
  assert.equal(m.sizeBytes, 3 * 65536 + 17);
  const out = new Uint8Array(100);
  m.read(m.sizeBytes - 100, out);
  assert.deepEqual(out, new Uint8Array(100));
  const data = Uint8Array.from({ length: 100 }, (_, i) => i * 7);
  m.write(1000, data);
  m.read(1000, out);
  assert.deepEqual(out, data);
  // small copies take a byte-by-byte path
  const small = Uint8Array.of(1, 2, 3, 4);
  m.write(m.sizeBytes - 4, small);
  const back = new Uint8Array(4);
  m.read(m.sizeBytes - 4, back);
  assert.deepEqual(back, small);
  assert.throws(() => m.read(m.sizeBytes - 3, back), { code: 'ERR_INTERNAL' });
  assert.throws(() => m.write(m.sizeBytes - 1, new Uint8Array(2)), { code: 'ERR_INTERNAL' });
  assert.throws(() => m.read(-1, out), { code: 'ERR_INTERNAL' });
});

test('a bad size is refused as bad input', () => {
  for (const size of [-1, 1.5, Number.NaN])
    assert.throws(() => new PhysMemory(size), { code: 'ERR_INVALID_ARGUMENT' });
});

test('the buffers are SharedArrayBuffers that workers can share', () => {
  const m = new PhysMemory(65536);
  assert.ok(m.buffers[0] instanceof SharedArrayBuffer);
  new Uint8Array(m.buffers[0]!)[5] = 9;
  assert.equal(m.view(5, 1)[0], 9);
});

test('checksum is stable and sees every single-byte change, in bulk and tail', () => {
  const m = randomMemory(4096 + 37);
  const base = m.checksum(0, m.sizeBytes);
  assert.equal(m.checksum(0, m.sizeBytes), base);
  for (const at of [0, 15, 16, 63, 64, 2047, 4095, 4096, 4096 + 36]) {
    const byte = m.view(at, 1);
    byte[0] ^= 0x01;
    assert.notEqual(m.checksum(0, m.sizeBytes), base, `flip at ${at}`);
    byte[0] ^= 0x01;
  }
  assert.equal(m.checksum(0, m.sizeBytes), base);
});

test('checksum sees every single-bit flip and pairs of top-bit flips', () => {
  const m = randomMemory(2048);
  const base = m.checksum(0, m.sizeBytes);
  for (let at = 0; at < m.sizeBytes; at++) {
    const byte = m.view(at, 1);
    for (let bit = 0; bit < 8; bit++) {
      byte[0] ^= 1 << bit;
      assert.notEqual(m.checksum(0, m.sizeBytes), base, `bit ${bit} of byte ${at}`);
      byte[0] ^= 1 << bit;
    }
  }
  // Two words whose top bits flip: 2^31 + 2^31 vanishes in a 32-bit sum, not in a 64-bit one.
  for (let word = 0; word + 64 < 512; word++) {
    const a = m.view(word * 4 + 3, 1);
    const b = m.view((word + 16) * 4 + 3, 1); // the same lane of the next block
    a[0] ^= 0x80;
    b[0] ^= 0x80;
    assert.notEqual(m.checksum(0, m.sizeBytes), base, `top bits of words ${word} and ${word + 16}`);
    a[0] ^= 0x80;
    b[0] ^= 0x80;
  }
});

test('checksum sees swapped blocks, uniform fills, length and seed', () => {
  const m = new PhysMemory(256);
  m.view(0, 64).fill(1);
  m.view(64, 64).fill(2);
  const before = m.checksum(0, 256);
  m.view(0, 64).fill(2);
  m.view(64, 64).fill(1);
  assert.notEqual(m.checksum(0, 256), before);
  const zeros = new PhysMemory(256);
  assert.notEqual(zeros.checksum(0, 64), zeros.checksum(0, 128), 'leading zeros count through the length');
  assert.notEqual(zeros.checksum(0, 64, 1), zeros.checksum(0, 64, 2));
  assert.notEqual(zeros.checksum(0, 256), before);
});

test('checksums and digests agree across segment boundaries', { timeout: 60_000 }, () => {
  const size = SEGMENT_BYTES + 3 * 65536;
  const a = new PhysMemory(size);
  const b = new PhysMemory(size);
  const data = new Uint8Array(256 * 1024);
  randomFillSync(data);
  const at = SEGMENT_BYTES - 100_000;
  a.write(at, data);
  b.write(at, data);
  assert.equal(a.checksum(at, data.length), b.checksum(at, data.length));
  assert.equal(a.digest(), b.digest());
  const back = new Uint8Array(data.length);
  a.read(at, back);
  assert.deepEqual(back, data);
  // a small copy across the segment boundary
  const edge = Uint8Array.of(9, 8, 7, 6, 5, 4);
  a.write(SEGMENT_BYTES - 3, edge);
  const edgeBack = new Uint8Array(6);
  a.read(SEGMENT_BYTES - 3, edgeBack);
  assert.deepEqual(edgeBack, edge);
  b.view(SEGMENT_BYTES + 5, 1)[0] ^= 0xff;
  assert.notEqual(a.digest(), b.digest());
  assert.throws(() => a.view(SEGMENT_BYTES - 1, 2), { code: 'ERR_INTERNAL' });
});
