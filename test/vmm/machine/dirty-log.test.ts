import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { DirtyLog, countDirtyPages, isPageDirty } from '../../../src/vmm/machine/dirty-log.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';

const MiB = 1 << 20;
const bad = { code: 'ERR_INVALID_ARGUMENT' };

function dirtyPages(bitmap: Uint32Array, pages: number): number[] {
  const out: number[] = [];
  for (let p = 0; p < pages; p++) if (isPageDirty(bitmap, p)) out.push(p);
  return out;
}

describe('dirty log', () => {
  test('host writes show in the next sync, exactly, and are cleared by it', () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'pc.ram', sizeBytes: MiB, gpa: 0n });
    ram.startDirtyLog();
    assert.deepEqual(dirtyPages(block.dirtyLog.syncAndClear(), block.pages), []);
    ram.write(0n, Uint8Array.of(1)); // page 0
    ram.write(BigInt(4096 * 30 + 10), new Uint8Array(2)); // page 30
    ram.write(BigInt(4096 * 31 + 4095), new Uint8Array(2)); // pages 31 and 32: a word boundary
    ram.write(BigInt(4096 * 100), new Uint8Array(4096 * 70)); // pages 100..169: whole words
    ram.write(BigInt(MiB - 1), Uint8Array.of(9)); // the last page
    const expected = [0, 30, 31, 32, ...Array.from({ length: 70 }, (_, i) => 100 + i), 255];
    const bitmap = block.dirtyLog.syncAndClear();
    assert.equal(bitmap.length, block.dirtyLog.words);
    assert.deepEqual(dirtyPages(bitmap, block.pages), expected);
    assert.equal(countDirtyPages(bitmap), expected.length);
    assert.equal(block.dirtyLog.pendingPages(), 0);
    assert.deepEqual(dirtyPages(block.dirtyLog.syncAndClear(), block.pages), []);
  });

  test('sync ORs into a given bitmap and checks its size', () => {
    const log = new DirtyLog(100);
    log.start();
    const into = new Uint32Array(log.words);
    into[0] = 0b1;
    log.markPages(1, 1);
    log.markPages(99, 1);
    assert.equal(log.syncAndClear(into), into);
    assert.deepEqual(dirtyPages(into, 100), [0, 1, 99]);
    assert.throws(() => log.syncAndClear(new Uint32Array(log.words + 1)), bad);
  });

  test('start clears, stop stops marking, and misuse is refused', () => {
    const ram = new GuestRam();
    const block = ram.addBlock({ name: 'pc.ram', sizeBytes: MiB, gpa: 0n });
    const log = block.dirtyLog;
    assert.equal(log.active, false);
    assert.throws(() => log.syncAndClear(), bad);
    assert.throws(() => ram.stopDirtyLog(), bad);
    ram.write(0n, Uint8Array.of(1)); // not logging: not marked
    assert.equal(log.pendingPages(), 0);
    ram.startDirtyLog();
    assert.ok(ram.dirtyLogActive);
    assert.throws(() => ram.startDirtyLog(), bad);
    assert.throws(() => log.start(), bad);
    ram.write(8192n, Uint8Array.of(1));
    assert.equal(log.pendingPages(), 1);
    ram.stopDirtyLog();
    assert.equal(ram.dirtyLogActive, false);
    ram.write(16384n, Uint8Array.of(1));
    assert.equal(log.pendingPages(), 1, 'a write after stop is not marked');
    ram.startDirtyLog();
    assert.equal(log.pendingPages(), 0, 'start begins from a clean bitmap');
    const synced = ram.syncDirtyLog();
    assert.deepEqual([...synced.keys()], ['pc.ram']);
  });

  test('marks every page count across word boundaries', () => {
    for (const [first, count] of [
      [0, 32],
      [31, 1],
      [31, 2],
      [5, 64],
      [33, 95],
      [0, 200],
    ] as const) {
      const log = new DirtyLog(200);
      log.start();
      log.markPages(first, count);
      const pages = dirtyPages(log.syncAndClear(), 200);
      assert.deepEqual(
        pages,
        Array.from({ length: count }, (_, i) => first + i),
        `[${first}, +${count})`,
      );
    }
  });

  test('a 4 GiB log syncs by words: 1 Mi pages in a 128 KiB bitmap', () => {
    const log = new DirtyLog(1 << 20);
    assert.equal(log.words * 4, 128 * 1024);
    log.start();
    log.markPages(0, 1 << 20);
    const bitmap = log.syncAndClear();
    assert.equal(countDirtyPages(bitmap), 1 << 20);
    assert.equal(log.pendingPages(), 0);
  });
});
