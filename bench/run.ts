import { writeFileSync } from 'node:fs';
import { benchDeviceSaveLoad } from './device-save-load.js';
import { benchIommufdMap } from './iommufd-map.js';
import { benchIommufdTranslate } from './iommufd-translate.js';
import { type BenchResult, machineLine, toMarkdown } from './report.js';
import { benchTransitions } from './transitions.js';
import { benchVmmDirty, vmmDirtyResult } from './vmm-dirty.js';
import { benchVmmDma } from './vmm-dma.js';
import { migrationResults } from './migration.js';

const f2 = (n: number) => n.toFixed(2);

async function deviceSaveLoad(): Promise<BenchResult> {
  const r = await benchDeviceSaveLoad(1 << 30);
  return {
    title: 'accel save + load, 1 GiB of random device memory (issue 2)',
    rows: [
      { metric: '(a) read(1 MiB) → write, GB/s', value: f2(r.readWriteGBps) },
      { metric: '(b) writeFrom(buf => saving.readInto(buf)), GB/s', value: f2(r.writeFromGBps) },
      { metric: '(c) Buffer copy of the same bytes in 1 MiB pieces, GB/s', value: f2(r.pieceCopyGBps) },
      { metric: '(d) one Buffer.copy of the whole 1 GiB, GB/s', value: f2(r.wholeCopyGBps) },
      {
        metric: '(b) / (c)',
        value: f2(r.writeFromVsPieceCopy),
        target: '≥ 0.5',
        met: r.writeFromVsPieceCopy >= 0.5,
      },
      { metric: '(a) / (c)', value: f2(r.readWriteVsPieceCopy) },
      { metric: '(b) / (d)', value: f2(r.writeFromVsWholeCopy) },
      {
        metric: "share of (b)'s checksums done on the checksum worker",
        value: f2(r.writeFromChecksumsOnWorker),
      },
    ],
    notes: [
      'Best of 3. Source device stopped in STOP_COPY, destination RESUMING → STOP (load with every record checksum verified) and digests compared after each run.',
      'Save + load does a full integrity check: a SIMD checksum over the source bytes and another over the destination bytes (64-bit lane sums, which every single-bit flip and every pair of changed words in different 64-byte blocks change). (b) copies once, device memory to device memory; (a) copies twice, through a user buffer, as read(2)/write(2) do.',
      'The checksums run mostly on a worker thread over the same shared wasm memories (the saver computes the next records ahead, the loader verifies behind the stream; RESUMING → STOP waits for every check), so the main thread mostly copies. The figure needs the second core free: with the other core busy it falls to about the single-threaded 0.4.',
      'The like-for-like baseline is (c): the stream moves data in 1 MiB pieces. (d) is one memcpy of 1 GiB.',
    ],
  };
}

async function iommufdMap(): Promise<BenchResult> {
  const { rows, gcExposed } = await benchIommufdMap();
  const out: BenchResult['rows'] = [];
  for (const r of rows) {
    const label = `${r.areas / 1024} Ki areas`;
    const last = r.areas === 1024 * 1024;
    out.push({
      metric: `${label}: map, s`,
      value: f2(r.mapSeconds),
      ...(last ? { target: '≤ 3', met: r.mapSeconds <= 3 } : {}),
    });
    out.push({
      metric: `${label}: unmap, s`,
      value: f2(r.unmapSeconds),
      ...(last ? { target: '≤ 3', met: r.unmapSeconds <= 3 } : {}),
    });
    out.push({ metric: `${label}: map with automatic IOVA, s`, value: f2(r.autoMapSeconds) });
    out.push({
      metric: `${label}: bytes per area (heap + typed arrays)`,
      value: gcExposed ? r.heapPlusArrayBufferBytesPerArea.toFixed(0) : 'n/a (needs --expose-gc)',
      ...(last && gcExposed ? { target: '≤ 300', met: r.heapPlusArrayBufferBytesPerArea <= 300 } : {}),
    });
  }
  const first = rows[0]!;
  const lastRow = rows[rows.length - 1]!;
  const growth = lastRow.mapSeconds / lastRow.areas / (first.mapSeconds / first.areas);
  out.push({ metric: 'map time per area, 1 Mi vs 64 Ki (n log n ≈ 1.25, n² = 16)', value: f2(growth) });
  return {
    title: 'iommufd: 4 KiB areas of a 4 GiB guest, device attached (issue 3, seed 001)',
    rows: out,
    notes: [
      'Each area is pinned and charged at map time (a domain is attached), then all are unmapped one by one.',
      'Automatic IOVA: N areas mapped without FIXED_IOVA into a fresh IOAS; the allocator finds the lowest fitting hole through hole-size maxima kept in the IOVA tree (O(log n) per map; a linear hole walk took 53 s for 40 Ki areas).',
    ],
  };
}

/** `npm run bench`: every benchmark in turn, results printed and written to docs/BENCHMARKS.md. */
const benchmarks: Record<string, () => Promise<BenchResult[]>> = {
  transitions: async () => [await benchTransitions()],
  'device-save-load': async () => [await deviceSaveLoad()],
  'iommufd-map': async () => [await iommufdMap()],
  'iommufd-translate': async () => [await benchIommufdTranslate()],
  'vmm-dirty': async () => [vmmDirtyResult(await benchVmmDirty())],
  'vmm-dma': async () => [await benchVmmDma()],
  migration: migrationResults,
};

// `npm run bench -- migration vmm-dma` runs only those (and prints, without writing the report).
const only = process.argv.slice(2);
const unknown = only.filter((name) => !(name in benchmarks));
if (unknown.length > 0)
  throw new Error(`unknown benchmark(s) ${unknown.join(', ')}: ${Object.keys(benchmarks).join(', ')}`);
console.log(`softvfio benchmarks on ${machineLine()}`);
const results: BenchResult[] = [];
for (const [name, run] of Object.entries(benchmarks)) {
  if (only.length > 0 && !only.includes(name)) continue;
  for (const result of await run()) {
    results.push(result);
    console.log(`\n${result.title}`);
    for (const row of result.rows) {
      const met = row.met === undefined ? '' : row.met ? '  [met]' : '  [NOT MET]';
      console.log(`  ${row.metric}: ${row.value}${row.target ? ` (target ${row.target})` : ''}${met}`);
    }
  }
}
if (only.length === 0) {
  const file = new URL('../../docs/BENCHMARKS.md', import.meta.url);
  writeFileSync(file, toMarkdown(results, new Date()));
  console.log(`\nwritten to docs/BENCHMARKS.md`);
}
