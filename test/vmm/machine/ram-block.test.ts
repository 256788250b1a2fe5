import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { PhysMemory, SEGMENT_BYTES } from '../../../src/kernel/mem/phys-memory.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { MAX_RAM_BLOCK_BYTES, type RamBlockOptions } from '../../../src/vmm/machine/ram-block.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const bad = { code: 'ERR_INVALID_ARGUMENT' };

describe('RAM block validation', () => {
  const cases: [string, RamBlockOptions][] = [
    ['empty name', { name: '', sizeBytes: 4 * KiB, gpa: 0n }],
    ['zero size', { name: 'r', sizeBytes: 0, gpa: 0n }],
    ['negative size', { name: 'r', sizeBytes: -4096, gpa: 0n }],
    ['size not a page multiple', { name: 'r', sizeBytes: 4 * KiB + 1, gpa: 0n }],
    ['fractional size', { name: 'r', sizeBytes: 4096.5, gpa: 0n }],
    ['size too large', { name: 'r', sizeBytes: MAX_RAM_BLOCK_BYTES * 2, gpa: 0n }],
    ['unaligned gpa', { name: 'r', sizeBytes: 4 * KiB, gpa: 512n }],
    ['negative gpa', { name: 'r', sizeBytes: 4 * KiB, gpa: -4096n }],
    ['number gpa', { name: 'r', sizeBytes: 4 * KiB, gpa: 0 as unknown as bigint }],
    ['end beyond 2^64', { name: 'r', sizeBytes: 8 * KiB, gpa: (1n << 64n) - 4096n }],
    [
      'discard block not a power of two',
      { name: 'r', sizeBytes: MiB, gpa: 0n, discard: { blockSizeBytes: 3 * 4096 } },
    ],
    ['discard block below a page', { name: 'r', sizeBytes: MiB, gpa: 0n, discard: { blockSizeBytes: 2048 } }],
    [
      'size not a block multiple',
      { name: 'r', sizeBytes: 3 * 64 * KiB, gpa: 0n, discard: { blockSizeBytes: 128 * KiB } },
    ],
    [
      'gpa not block aligned',
      { name: 'r', sizeBytes: MiB, gpa: 64n * 1024n, discard: { blockSizeBytes: MiB } },
    ],
    ['memory of another size', { name: 'r', sizeBytes: MiB, gpa: 0n, memory: new PhysMemory(2 * MiB) }],
    ['memory that is not a PhysMemory', { name: 'r', sizeBytes: 4096, gpa: 0n, memory: {} as PhysMemory }],
    [
      'bad plugged state',
      { name: 'r', sizeBytes: MiB, gpa: 0n, discard: { blockSizeBytes: MiB, plugged: 'some' as 'all' } },
    ],
  ];
  for (const [what, options] of cases) {
    test(`refuses ${what}`, () => {
      assert.throws(() => new GuestRam().addBlock(options), bad);
    });
  }

  test('a block may end exactly at 2^64', () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'top', sizeBytes: 8 * KiB, gpa: (1n << 64n) - 8192n });
    assert.equal(block.endGpa, 1n << 64n);
  });

  test('names are unique and GPA ranges do not overlap', () => {
    const ram = new GuestRam();
    ram.addBlock({ name: 'low', sizeBytes: MiB, gpa: 0n });
    assert.throws(() => ram.addBlock({ name: 'low', sizeBytes: MiB, gpa: 4n * BigInt(MiB) }), bad);
    assert.throws(() => ram.addBlock({ name: 'high', sizeBytes: MiB, gpa: BigInt(MiB) - 4096n }), bad);
    assert.throws(() => ram.addBlock({ name: 'around', sizeBytes: 4 * MiB, gpa: 0n }), bad);
    ram.addBlock({ name: 'high', sizeBytes: MiB, gpa: BigInt(MiB) }); // adjacent is fine
    assert.deepEqual(
      ram.blocks.map((b) => b.name),
      ['low', 'high'],
    );
    assert.equal(ram.totalBytes, 2 * MiB);
    assert.equal(ram.totalPages, 512);
    assert.throws(() => ram.block('nope'), bad);
  });
});

describe('guest RAM access', () => {
  test('a block over an existing PhysMemory reads and writes those bytes; a discard zeroes them', () => {
    const memory = new PhysMemory(MiB);
    memory.write(4096, Uint8Array.of(5, 6));
    const ram = new GuestRam();
    const block = ram.addBlock({
      name: 'mem',
      sizeBytes: MiB,
      gpa: 0n,
      memory,
      discard: { blockSizeBytes: 256 * KiB, plugged: 'all' },
    });
    assert.equal(block.memory, memory);
    const out = new Uint8Array(2);
    ram.read(4096n, out);
    assert.deepEqual(out, Uint8Array.of(5, 6));
    block.write(8192, Uint8Array.of(7));
    assert.equal(memory.view(8192, 1)[0], 7);
    block.discard!.unplug(0);
    assert.ok(memory.view(0, 256 * KiB).every((b) => b === 0));
  });

  test('read and write by guest-physical address, inside one block', () => {
    const ram = new GuestRam();
    const low = ram.addBlock({ name: 'low', sizeBytes: MiB, gpa: 0n });
    const high = ram.addBlock({ name: 'high', sizeBytes: MiB, gpa: 1n << 32n });
    ram.write((1n << 32n) + 100n, Uint8Array.of(1, 2, 3));
    const out = new Uint8Array(3);
    ram.read((1n << 32n) + 100n, out);
    assert.deepEqual(out, Uint8Array.of(1, 2, 3));
    high.read(100, out);
    assert.deepEqual(out, Uint8Array.of(1, 2, 3));
    assert.deepEqual(ram.lookup(5000n), { block: low, offset: 5000 });
    assert.throws(() => ram.read(BigInt(MiB), out), bad); // hole
    assert.throws(() => ram.write(BigInt(MiB) - 1n, out), bad); // crosses the end
    assert.throws(() => low.write(MiB - 2, out), bad);
    assert.throws(() => low.read(-1, out), bad);
  });

  test('a block bigger than one 1 GiB segment is written across the segment boundary', () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'big', sizeBytes: SEGMENT_BYTES + 64 * KiB, gpa: 0n });
    assert.equal(block.memory.buffers.length, 2);
    const data = Uint8Array.from({ length: 8192 }, (_, i) => i & 0xff);
    block.write(SEGMENT_BYTES - 4096, data);
    const out = new Uint8Array(8192);
    ram.read(BigInt(SEGMENT_BYTES - 4096), out);
    assert.deepEqual(out, data);
  });
});
