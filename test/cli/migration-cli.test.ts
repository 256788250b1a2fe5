import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

/** `softvfio incoming|migrate|demo` as child processes: help and command-line checks. */
const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

async function softvfio(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [MAIN, ...args]);
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code?: unknown; stdout?: string; stderr?: string };
    assert.equal(typeof e.code, 'number', `softvfio did not run: ${String(error)}`);
    return { code: e.code as number, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe('the migration commands of the built CLI', () => {
  test('--help of incoming, migrate and demo: exit 0 with their options', async () => {
    for (const [command, options] of [
      ['incoming', ['--vm <name>', '--listen <host:port>', '--wait', '--connect <host:port>']],
      ['migrate', ['--vm <name>', '--to <uri>', '-p, --param <name=value>', '--detach', '--json']],
      [
        'demo',
        ['--ram <size>', '(default: 1GiB)', '--dirty-rate <MiB/s>', '--max-bandwidth <size/s>', '--keep'],
      ],
    ] as const) {
      const run = await softvfio(command, '--help');
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, new RegExp(`^Usage: softvfio ${command} \\[options\\]`));
      for (const option of options) assert.ok(run.stdout.includes(option), `${command}: ${option}`);
    }
  });

  test('bad command lines are exit 2 with the option named', async () => {
    for (const [args, message] of [
      [['migrate', '--to', 'tcp:127.0.0.1:4444'], /required option '--vm <name>' not specified/],
      [
        ['migrate', '--vm', 'v', '--to', '127.0.0.1:4444'],
        /'--to <uri>' argument '127\.0\.0\.1:4444' is invalid/,
      ],
      [['migrate', '--vm', '../v', '--to', 'tcp:h:1'], /'--vm <name>' argument '\.\.\/v' is invalid/],
      [
        ['incoming', '--vm', 'v', '--listen', 'anywhere'],
        /'--listen <host:port>' argument 'anywhere' is invalid/,
      ],
      [['demo', '--ram', '1GB'], /'--ram <size>' argument '1GB' is invalid/],
      [
        ['demo', '--channels', '0'],
        /'--channels <n>' argument '0' is invalid\. expected an integer from 1 to 255/,
      ],
      [['demo', '--downtime-limit', 'soon'], /'--downtime-limit <ms>' argument 'soon' is invalid/],
    ] as const) {
      const run = await softvfio(...args);
      assert.equal(run.code, 2, args.join(' '));
      assert.match(run.stderr, message);
    }
  });
});
