import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { isPageDirty } from '../../../src/vmm/machine/dirty-log.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import type { RamDiscardEvent } from '../../../src/vmm/machine/ram-discard.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 256 * KiB;
const BASE = 1n << 32n;
const bad = { code: 'ERR_INVALID_ARGUMENT' };

function region(plugged: 'all' | 'none' = 'none') {
  const ram = new GuestRam();
  const block = ram.addBlock({
    name: 'mem0',
    sizeBytes: 2 * MiB,
    gpa: BASE,
    discard: { blockSizeBytes: BLOCK, plugged },
  });
  const events: RamDiscardEvent[] = [];
  block.discard!.onChange((e) => events.push(e));
  return { ram, block, discard: block.discard!, events };
}

const allZero = (bytes: Uint8Array) => bytes.every((b) => b === 0);

describe('discardable RAM', () => {
  test('starts unplugged by default; writes to unplugged blocks are refused', () => {
    const { ram, discard } = region();
    assert.equal(discard.blockCount, 8);
    assert.equal(discard.pluggedBytes, 0);
    assert.deepEqual(discard.pluggedBlocks(), []);
    assert.throws(() => ram.write(BASE, Uint8Array.of(1)), bad);
    assert.deepEqual(region('all').discard.pluggedBlocks(), [0, 1, 2, 3, 4, 5, 6, 7]);
  });

  test('plug and unplug emit one event per block with its address, in order', () => {
    const { discard, events } = region();
    discard.plug(2, 3);
    discard.unplug(3);
    assert.deepEqual(events, [
      { kind: 'plug', ramBlock: 'mem0', block: 2, gpa: BASE + 2n * BigInt(BLOCK), lengthBytes: BLOCK },
      { kind: 'plug', ramBlock: 'mem0', block: 3, gpa: BASE + 3n * BigInt(BLOCK), lengthBytes: BLOCK },
      { kind: 'plug', ramBlock: 'mem0', block: 4, gpa: BASE + 4n * BigInt(BLOCK), lengthBytes: BLOCK },
      { kind: 'unplug', ramBlock: 'mem0', block: 3, gpa: BASE + 3n * BigInt(BLOCK), lengthBytes: BLOCK },
    ]);
    assert.deepEqual(discard.pluggedBlocks(), [2, 4]);
    assert.equal(discard.pluggedBytes, 2 * BLOCK);
    assert.ok(discard.isPlugged(2) && !discard.isPlugged(3));
    assert.ok(discard.isRangePlugged(2 * BLOCK, BLOCK) && !discard.isRangePlugged(2 * BLOCK, BLOCK + 1));
  });

  test('unplug zeroes the block; plugged again, it reads zero', () => {
    const { ram, block, discard } = region('all');
    const data = new Uint8Array(BLOCK + 8192).fill(0xab);
    ram.write(BASE + BigInt(BLOCK - 4096), data); // blocks 0, 1 and 2
    discard.unplug(1);
    assert.ok(allZero(block.memory.view(BLOCK, BLOCK)));
    assert.ok(block.memory.view(BLOCK - 4096, 4096).every((b) => b === 0xab));
    assert.ok(block.memory.view(2 * BLOCK, 4096).every((b) => b === 0xab));
    assert.throws(() => block.write(BLOCK, Uint8Array.of(1)), bad);
    discard.plug(1);
    const out = new Uint8Array(BLOCK);
    block.read(BLOCK, out);
    assert.ok(allZero(out));
    block.write(BLOCK, Uint8Array.of(1));
  });

  test('plugging a plugged block, unplugging an unplugged one, or a bad range is refused and changes nothing', () => {
    const { discard, events } = region();
    discard.plug(0, 2);
    events.length = 0;
    assert.throws(() => discard.plug(1, 2), bad); // block 1 is plugged
    assert.throws(() => discard.unplug(1, 2), bad); // block 2 is not
    assert.throws(() => discard.plug(7, 2), bad);
    assert.throws(() => discard.plug(-1), bad);
    assert.throws(() => discard.plug(0, 0), bad);
    assert.throws(() => discard.plug(1.5), bad);
    assert.throws(() => discard.isPlugged(8), bad);
    assert.deepEqual(events, []);
    assert.deepEqual(discard.pluggedBlocks(), [0, 1]);
  });

  test('a listener refusing a plug rolls it back: earlier listeners hear an unplug', () => {
    const { discard, events } = region();
    const refusal = new Error('no DMA mapping left');
    const stop = discard.onChange((e) => {
      if (e.kind === 'plug' && e.block === 5) throw refusal;
    });
    assert.throws(() => discard.plug(4, 2), refusal);
    assert.deepEqual(discard.pluggedBlocks(), [4]);
    assert.deepEqual(
      events.map((e) => `${e.kind} ${e.block}`),
      ['plug 4', 'plug 5', 'unplug 5'],
    );
    stop();
    discard.plug(5);
    assert.deepEqual(discard.pluggedBlocks(), [4, 5]);
  });

  test('unplugged pages are marked dirty while logging, so a migration sends the zeros', () => {
    const { ram, block, discard } = region('all');
    ram.startDirtyLog();
    discard.unplug(1);
    const bitmap = block.dirtyLog.syncAndClear();
    const pagesPerBlock = BLOCK / 4096;
    for (let p = 0; p < block.pages; p++) {
      const inBlock1 = p >= pagesPerBlock && p < 2 * pagesPerBlock;
      assert.equal(isPageDirty(bitmap, p), inBlock1, `page ${p}`);
    }
    discard.plug(1); // plugged memory is already zero: nothing dirtied
    assert.equal(block.dirtyLog.pendingPages(), 0);
  });
});
