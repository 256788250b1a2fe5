import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { isPageDirty } from '../../../src/vmm/machine/dirty-log.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { type RamPacket, RamPacketBuilder } from '../../../src/vmm/migration/ram-scan.js';
import { RamSender } from '../../../src/vmm/migration/ram-sender.js';
import {
  FrameDecoder,
  FrameType,
  MAX_NORMAL_PAGES,
  RAM_PAGE_BYTES,
} from '../../../src/vmm/migration/wire-format.js';

const MiB = 1 << 20;

/** A guest with a 2 MiB block (512 pages) and a 1 MiB one; `data` pages hold a byte of their number. */
function guest(data: (block: number, page: number) => boolean): GuestRam {
  const ram = new GuestRam();
  ram.addBlock({ name: 'pc.ram', sizeBytes: 2 * MiB, gpa: 0n });
  ram.addBlock({ name: 'vga.ram', sizeBytes: MiB, gpa: 1n << 32n });
  ram.blocks.forEach((block, b) => {
    for (let p = 0; p < block.pages; p++) {
      if (data(b, p)) block.memory.view(p * RAM_PAGE_BYTES + (p % 4096), 1)[0] = (p % 255) + 1;
    }
  });
  return ram;
}

interface Sent {
  normal: Set<string>;
  zero: Set<string>;
}

/** Decode a packet as the destination would and check its body is the pages' bytes, in order. */
function take(ram: GuestRam, packet: RamPacket, sent: Sent): void {
  const decoder = new FrameDecoder('to-destination');
  decoder.push(packet.header);
  const event = decoder.next();
  assert.ok(event?.kind === 'frame' && event.frame.type === FrameType.RAM_PAGES);
  const frame = event.frame;
  assert.ok(frame.normal.length <= MAX_NORMAL_PAGES);
  assert.equal(frame.normal.length, packet.normalPages);
  assert.equal(frame.zero.length, packet.zeroPages);
  const body = Buffer.concat(packet.body);
  assert.equal(body.length, frame.normal.length * RAM_PAGE_BYTES);
  assert.equal(packet.bytes, packet.header.length + body.length);
  const block = ram.blocks[frame.block]!;
  frame.normal.forEach((page, i) => {
    const page_ = body.subarray(i * RAM_PAGE_BYTES, (i + 1) * RAM_PAGE_BYTES);
    assert.deepEqual(page_, Buffer.from(block.memory.view(page * RAM_PAGE_BYTES, RAM_PAGE_BYTES)));
    assert.ok(
      page_.some((b) => b !== 0),
      `page ${page} has data`,
    );
    const key = `${frame.block}:${page}`;
    assert.ok(!sent.normal.has(key) && !sent.zero.has(key), `page ${key} sent once`);
    sent.normal.add(key);
  });
  for (const page of frame.zero) {
    assert.ok(block.memory.view(page * RAM_PAGE_BYTES, RAM_PAGE_BYTES).every((b) => b === 0));
    const key = `${frame.block}:${page}`;
    assert.ok(!sent.normal.has(key) && !sent.zero.has(key), `page ${key} sent once`);
    sent.zero.add(key);
  }
}

const hasData = (block: number, page: number) => (block === 0 ? page < 200 && page % 7 !== 3 : page === 100);

describe('RAM sender', () => {
  test('packets: data pages as views of guest RAM, zero pages by number only, every page once', () => {
    const ram = guest(hasData);
    const sender = new RamSender(ram);
    sender.markAll();
    assert.equal(sender.dirtyPages, 512 + 256);
    const sent: Sent = { normal: new Set(), zero: new Set() };
    let packets = 0;
    for (let packet = sender.nextPacket(); packet !== undefined; packet = sender.nextPacket()) {
      take(ram, packet, sent);
      packets++;
      assert.equal(sender.dirtyPages, 512 + 256 - sent.normal.size - sent.zero.size);
    }
    const data = [...Array(200).keys()].filter((p) => p % 7 !== 3).map((p) => `0:${p}`);
    assert.deepEqual([...sent.normal].sort(), [...data, '1:100'].sort());
    assert.equal(sent.zero.size, 512 + 256 - data.length - 1);
    assert.equal(packets, 3); // 171 data pages: 128 + 43 in block 0, and block 1's one
    for (const { bitmap } of sender.sharedBlocks)
      assert.ok(
        bitmap.every((w) => w === 0),
        'bits cleared',
      );
  });

  test('jobs: whole bitmap words holding about maxPages dirty pages, disjoint, in order, within a block', () => {
    const ram = guest(hasData);
    const sender = new RamSender(ram);
    ram.startDirtyLog();
    sender.markAll();
    sender.syncDirtyLog();
    // A second round: a few pages dirty again, an empty word between them, and one a device reports.
    for (const { bitmap } of sender.sharedBlocks) bitmap.fill(0);
    ram.write(0n, new Uint8Array(4096 * 40)); // pages 0..39
    ram.write(BigInt(4096 * 100), Uint8Array.of(5)); // page 100
    sender.syncDirtyLog();
    sender.markPages(1, 255, 1);
    assert.equal(sender.dirtyPages, 42);
    sender.rewind();
    const jobs = [];
    for (let job = sender.nextJob(10); job !== undefined; job = sender.nextJob(10)) jobs.push(job);
    assert.deepEqual(jobs, [
      { block: 0, fromWord: 0, toWord: 1, pages: 32 },
      // Under maxPages, a job goes on to the end of the block, across the empty word 2.
      { block: 0, fromWord: 1, toWord: 16, pages: 9 },
      { block: 1, fromWord: 7, toWord: 8, pages: 1 },
    ]);
    assert.equal(sender.dirtyPages, 0);
  });

  test('jobs run by packet builders of their own (as channel threads do) send every page once', () => {
    const ram = guest(hasData);
    const sender = new RamSender(ram);
    sender.markAll();
    const builders = sender.sharedBlocks.map((shared, b) => new RamPacketBuilder(b, shared));
    const sent: Sent = { normal: new Set(), zero: new Set() };
    let jobPages = 0;
    for (let job = sender.nextJob(100); job !== undefined; job = sender.nextJob(100)) {
      assert.ok(job.pages >= 100 || job.toWord === sender.sharedBlocks[job.block]!.bitmap.length);
      assert.ok(job.pages < 100 + 32);
      jobPages += job.pages;
      const range = { word: job.fromWord, end: job.toWord };
      let pages = 0;
      for (let packet = builders[job.block]!.next(range); packet; packet = builders[job.block]!.next(range)) {
        take(ram, packet, sent);
        pages += packet.normalPages + packet.zeroPages;
      }
      assert.equal(pages, job.pages, 'a job sends the pages it was cut with');
    }
    assert.equal(jobPages, 512 + 256);
    assert.equal(sent.normal.size + sent.zero.size, 512 + 256);
    for (const { bitmap } of sender.sharedBlocks)
      assert.ok(
        bitmap.every((w) => w === 0),
        'bits cleared',
      );
  });

  test('the bitmap is shared memory that a thread can be given, and the first round skips unplugged blocks', () => {
    const ram = new GuestRam();
    const block = ram.addBlock({
      name: 'mem0',
      sizeBytes: 4 * MiB,
      gpa: 0n,
      discard: { blockSizeBytes: 2 * MiB, plugged: 'none' },
    });
    block.discard!.plug(1);
    const sender = new RamSender(ram);
    assert.ok(sender.sharedBlocks[0]!.bitmap.buffer instanceof SharedArrayBuffer);
    assert.equal(sender.sharedBlocks[0]!.segments[0], block.memory.buffers[0]);
    sender.markAll();
    const bitmap = sender.sharedBlocks[0]!.bitmap;
    assert.equal(sender.dirtyPages, 512);
    assert.ok(!isPageDirty(bitmap, 0) && !isPageDirty(bitmap, 511) && isPageDirty(bitmap, 512));
  });
});
