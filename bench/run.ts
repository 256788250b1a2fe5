import { writeFileSync } from 'node:fs';
import { type BenchResult, machineLine, toMarkdown } from './report.js';
import { benchTransitions } from './transitions.js';

/** `npm run bench`: every benchmark in turn, results printed and written to docs/BENCHMARKS.md. */
const benchmarks: (() => Promise<BenchResult>)[] = [benchTransitions];

console.log(`softvfio benchmarks on ${machineLine()}`);
const results: BenchResult[] = [];
for (const run of benchmarks) {
  const result = await run();
  results.push(result);
  console.log(`\n${result.title}`);
  for (const row of result.rows) {
    const met = row.met === undefined ? '' : row.met ? '  [met]' : '  [NOT MET]';
    console.log(`  ${row.metric}: ${row.value}${row.target ? ` (target ${row.target})` : ''}${met}`);
  }
}
const file = new URL('../../docs/BENCHMARKS.md', import.meta.url);
writeFileSync(file, toMarkdown(results, new Date()));
console.log(`\nwritten to docs/BENCHMARKS.md`);
