import { cpus, totalmem } from 'node:os';

/** One measured figure; `target` and `met` where the issue sets a target. */
export interface BenchRow {
  metric: string;
  value: string;
  target?: string;
  met?: boolean;
}

export interface BenchResult {
  title: string;
  rows: BenchRow[];
  notes?: string[];
}

export function machineLine(): string {
  const cpu = cpus()[0]?.model ?? 'unknown CPU';
  const gib = (totalmem() / 2 ** 30).toFixed(0);
  return `${cpus().length} × ${cpu}, ${gib} GiB RAM, Node ${process.version}, ${process.platform}/${process.arch}`;
}

export function toMarkdown(results: BenchResult[], when: Date): string {
  const out = [
    '# Benchmarks',
    '',
    `Measured by \`npm run bench\` on ${when.toISOString().slice(0, 10)}: ${machineLine()}.`,
    'Every ratio compares against a baseline measured in the same run, because these machines are shared and noisy.',
    '',
  ];
  for (const r of results) {
    out.push(`## ${r.title}`, '', '| metric | value | target | met |', '|---|---|---|---|');
    for (const row of r.rows) {
      const met = row.met === undefined ? '' : row.met ? 'yes' : '**no**';
      out.push(`| ${row.metric} | ${row.value} | ${row.target ?? ''} | ${met} |`);
    }
    if (r.notes?.length) out.push('', ...r.notes.map((n) => `- ${n}`));
    out.push('');
  }
  return out.join('\n');
}
