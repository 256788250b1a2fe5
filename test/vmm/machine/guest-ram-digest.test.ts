import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { guestRamDigest } from '../../../src/vmm/machine/guest-ram-digest.js';

const MiB = 1 << 20;

function twoBlocks(order: 'low-first' | 'high-first'): GuestRam {
  const ram = new GuestRam();
  const specs = [
    { name: 'low', sizeBytes: MiB, gpa: 0n },
    { name: 'high', sizeBytes: 2 * MiB, gpa: 1n << 32n },
  ];
  for (const s of order === 'low-first' ? specs : specs.reverse()) ram.addBlock(s);
  return ram;
}

test('the digest combines every block and does not depend on the order blocks were added', () => {
  const a = twoBlocks('low-first');
  const b = twoBlocks('high-first');
  assert.equal(a.digest(), b.digest());
  assert.equal(a.digest(), guestRamDigest(a.blocks));
  a.write((1n << 32n) + BigInt(MiB), Uint8Array.of(7));
  assert.notEqual(a.digest(), b.digest());
  b.write((1n << 32n) + BigInt(MiB), Uint8Array.of(7));
  assert.equal(a.digest(), b.digest());
  a.write(4095n, Uint8Array.of(1));
  assert.notEqual(a.digest(), b.digest());
});

test('the digest sees the layout: same bytes at another address or name differ', () => {
  const a = new GuestRam();
  a.addBlock({ name: 'r', sizeBytes: MiB, gpa: 0n });
  const b = new GuestRam();
  b.addBlock({ name: 'r', sizeBytes: MiB, gpa: BigInt(MiB) });
  const c = new GuestRam();
  c.addBlock({ name: 's', sizeBytes: MiB, gpa: 0n });
  assert.notEqual(a.digest(), b.digest());
  assert.notEqual(a.digest(), c.digest());
  assert.match(a.digest(), /^[0-9a-f]{64}$/);
});
