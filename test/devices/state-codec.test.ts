import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { createBasicDevice } from '../../src/devices/basic-device.js';
import { StateLoader } from '../../src/devices/state/state-loader.js';
import { DeviceStateImage } from '../../src/devices/state/state-region.js';
import { StateSaver } from '../../src/devices/state/state-saver.js';
import {
  encodeRecordHeader,
  RECORD_HEADER_BYTES,
  RecordKind,
  STREAM_HEADER_BYTES,
} from '../../src/devices/state/stream-format.js';
import { VfioError } from '../../src/uapi/error.js';
import { assertLoadFails, concat, loadStream, saveStream } from './helpers.js';

function image(sizes = [200_000, 4096]): DeviceStateImage {
  return new DeviceStateImage(
    'codec',
    1,
    sizes.map((s, i) => ({ name: `r${i}`, sizeBytes: s, precopy: i === 0 })),
  );
}

function fillRandom(img: DeviceStateImage, seed: number): void {
  let x = seed;
  for (const r of img.regions) {
    const v = r.mutate(0, r.sizeBytes);
    for (let i = 0; i < v.length; i += 97) {
      x = (x * 1103515245 + 12345) >>> 0;
      v[i] = x >>> 24;
    }
  }
}

function saveAll(img: DeviceStateImage, sizes: () => number): Uint8Array {
  const saver = new StateSaver(img, { precopy: false, dataReady: () => {}, stopDevice: () => {} });
  const parts: Uint8Array[] = [];
  for (;;) {
    const buf = new Uint8Array(sizes());
    const n = saver.read(buf);
    if (n === 0) break;
    parts.push(buf.subarray(0, n));
  }
  saver.end();
  return concat(parts);
}

test('any read and write chunking gives the same stream and the same loaded state', () => {
  const src = image();
  fillRandom(src, 7);
  const reference = saveAll(src, () => 1 << 20);
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: 70_000 }), { minLength: 1, maxLength: 20 }), (sizes) => {
      let i = 0;
      const next = () => sizes[i++ % sizes.length]!;
      const bytes = saveAll(src, next);
      assert.deepEqual(bytes, reference);
      const dst = image();
      const loader = new StateLoader(dst);
      for (let at = 0; at < bytes.length;) {
        const n = Math.min(next(), bytes.length - at);
        loader.write(bytes.subarray(at, at + n));
        at += n;
      }
      loader.finish();
      assert.equal(dst.digest(), src.digest());
    }),
    { numRuns: 30 },
  );
});

test('writeFrom splices a saving stream into a resume stream with the same result as write', () => {
  const src = image();
  fillRandom(src, 3);
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 50_000 }), (cap) => {
      const saver = new StateSaver(src, { precopy: false, dataReady: () => {}, stopDevice: () => {} });
      const dst = image();
      const loader = new StateLoader(dst);
      let calls = 0;
      while (loader.writeFrom((target) => saver.read(target.subarray(0, Math.min(cap, target.length)))) > 0)
        calls++;
      saver.end();
      loader.finish();
      assert.ok(calls > 0);
      assert.equal(dst.digest(), src.digest());
    }),
    { numRuns: 20 },
  );
});

test('precopy: initial bytes shrink as read, writes re-dirty sent chunks, the stream stays consistent', () => {
  const src = image([1 << 20, 4096]);
  fillRandom(src, 11);
  let ready = 0;
  let stopped = false;
  const saver = new StateSaver(src, {
    precopy: true,
    dataReady: () => ready++,
    stopDevice: () => {
      stopped = true;
    },
  });
  const info0 = saver.precopyInfo();
  assert.equal(info0.initialBytes, BigInt(STREAM_HEADER_BYTES + (1 << 20)));
  assert.equal(info0.dirtyBytes, 0n);
  const parts: Uint8Array[] = [];
  const buf = new Uint8Array(300_000);
  let n = saver.read(buf);
  parts.push(buf.slice(0, n));
  assert.equal(saver.precopyInfo().initialBytes, info0.initialBytes + 24n - BigInt(n));
  // a write into the record being read (not yet sent part) and one into a sent chunk
  const r0 = src.regions[0]!;
  r0.mutate(900_000, 10).fill(0xaa);
  r0.mutate(10, 10).fill(0xbb);
  assert.equal(saver.precopyInfo().dirtyBytes, 2n * 65536n);
  assert.ok(ready >= 1);
  for (n = saver.read(buf); n > 0; n = saver.read(buf)) parts.push(buf.slice(0, n));
  assert.deepEqual(saver.precopyInfo(), { initialBytes: 0n, dirtyBytes: 0n });
  assert.equal(saver.read(buf), 0);
  saver.enterStopCopy();
  assert.ok(stopped);
  for (n = saver.read(buf); n > 0; n = saver.read(buf)) parts.push(buf.slice(0, n));
  saver.end();
  const dst = image([1 << 20, 4096]);
  const loader = new StateLoader(dst);
  loader.write(concat(parts));
  loader.finish();
  assert.equal(dst.digest(), src.digest());
});

test('hostile record headers are rejected before any write or allocation', () => {
  const src = image();
  const header = saveAll(src, () => 1 << 20).subarray(0, STREAM_HEADER_BYTES);
  const cases: [number, number, bigint][] = [
    [0, 0xffffffff, 0n], // 4 GiB length
    [0, 4096, 2n ** 63n], // offset far out
    [0, 4096, 199_000n], // runs past the end of the region
    [7, 4096, 0n], // no such region
    [0, 0, 0n], // empty
    [0, 65536, (1n << 20n) - 100n], // crosses a 1 MiB block (region is 200 KB, so out of range too)
  ];
  for (const [region, length, offset] of cases) {
    const rec = new Uint8Array(RECORD_HEADER_BYTES);
    encodeRecordHeader(new DataView(rec.buffer), RecordKind.DATA, region, length, offset, 0n);
    const dst = image();
    const before = dst.digest();
    const loader = new StateLoader(dst);
    loader.write(header);
    assert.throws(() => loader.write(rec), { errno: 'EINVAL' });
    assert.throws(() => loader.write(new Uint8Array(8)), { errno: 'EINVAL' }, 'sticky');
    assert.throws(() => loader.finish(), { errno: 'EINVAL' });
    assert.equal(dst.digest(), before);
  }
});

test('basic: save -> load through VfioDevice round-trips, and every single-bit flip fails the load', () => {
  const source = createBasicDevice({ seed: 5 });
  source.work(50);
  const dest = createBasicDevice({ seed: 99 });
  assert.notEqual(dest.digest(), source.digest());
  const bytes = saveStream(source, { chunk: 1000 });
  loadStream(dest, bytes, 333);
  assert.equal(dest.digest(), source.digest());
  // both continue identically (the PRNG state migrated)
  source.vfio.setMigDeviceState(2);
  dest.vfio.setMigDeviceState(2);
  source.work(10);
  dest.work(10);
  assert.equal(dest.digest(), source.digest());
  for (let at = 0; at < bytes.length; at++) {
    const bad = bytes.slice();
    bad[at]! ^= 1 << (at % 8); // every byte, every bit position (top bits of words included)
    const d = createBasicDevice();
    d.vfio.setMigDeviceState(1);
    const s = d.vfio.setMigDeviceState(4) as import('../../src/kernel/vfio/mig-data-stream.js').ResumeStream;
    let failed = false;
    try {
      s.write(bad);
      d.vfio.setMigDeviceState(1);
    } catch (err) {
      assert.ok(err instanceof VfioError && (err.errno === 'EINVAL' || err.errno === 'EIO'), String(err));
      failed = true;
    }
    assert.ok(failed, `flip at ${at} went unnoticed`);
  }
});

test('basic: load failures fail RESUMING->STOP', () => {
  const source = createBasicDevice({ seed: 5 });
  source.work(3);
  const bytes = saveStream(source);
  const dest = createBasicDevice();
  assertLoadFails(dest, bytes.subarray(0, bytes.length - 1), 'EINVAL'); // truncated
  assertLoadFails(dest, bytes.subarray(0, 10), 'EINVAL');
  const flipped = bytes.slice();
  flipped[STREAM_HEADER_BYTES + RECORD_HEADER_BYTES + 100]! ^= 1;
  assertLoadFails(dest, flipped, 'EIO');
  assertLoadFails(createBasicDevice({ registerBytes: 8192 }), bytes, 'EINVAL'); // configuration
  const foreign = bytes.slice();
  foreign.set(new TextEncoder().encode('nic\0\0'), 8);
  assertLoadFails(dest, foreign, 'EINVAL');
  // and after all that a good stream still loads
  loadStream(dest, bytes);
  assert.equal(dest.digest(), source.digest());
});

test('basic: work does nothing unless running; reset returns to power-on', () => {
  const d = createBasicDevice({ seed: 1 });
  const powerOn = d.digest();
  d.work(3);
  const worked = d.digest();
  assert.notEqual(worked, powerOn);
  d.vfio.setMigDeviceState(1);
  d.work(3);
  assert.equal(d.digest(), worked);
  d.vfio.reset();
  assert.equal(d.digest(), powerOn);
  assert.equal(d.vfio.getMigDeviceState(), 2);
  assert.ok(d.vfio.getMigDataSize() > 4096n);
});
