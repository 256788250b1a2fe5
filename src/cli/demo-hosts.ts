import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { VfioError } from '../uapi/error.js';
import { formatAddress, parseTcpAddress } from '../vmm/host/listen-address.js';
import { connectHost, type DemoHostApi } from './migration-api.js';

/** One software host the demo runs. */
export interface DemoHost {
  /** Where its control API listens (`tcp:127.0.0.1:PORT`), for messages. */
  address: string;
  api: DemoHostApi;
  /** Shut the host down and wait until it is gone; never throws. */
  shutdown(): Promise<void>;
}

export interface SpawnHostOptions {
  /** Time for the host to say where it listens (15 s). */
  startTimeoutMs?: number;
  /** Time for the host to exit after POST /shutdown before it is killed (10 s). */
  exitTimeoutMs?: number;
}

const MAIN = fileURLToPath(new URL('./main.js', import.meta.url));
/** Last lines of a host's stderr kept for the error when it fails to start. */
const STDERR_LINES = 20;

/*
 * Hosts run in their own process group so that a Ctrl-C on the terminal reaches the demo only,
 * which cancels the migration and shuts them down in order. Should the demo exit without having
 * done that, this kills what is left.
 */
const live = new Set<ChildProcess>();
let killOnExit = false;
function track(child: ChildProcess): void {
  live.add(child);
  child.once('exit', () => live.delete(child));
  if (!killOnExit) {
    killOnExit = true;
    process.once('exit', () => {
      for (const c of live) c.kill('SIGKILL');
    });
  }
}

/**
 * `softvfio host --name NAME --listen 127.0.0.1:0 --json` as a child process of this Node.js
 * binary; resolves once it has printed its 'listening' line.
 */
export async function spawnDemoHost(name: string, options: SpawnHostOptions = {}): Promise<DemoHost> {
  const child = spawn(process.execPath, [MAIN, 'host', '--name', name, '--listen', '127.0.0.1:0', '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  track(child);
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
  const stderr: string[] = [];
  createInterface({ input: child.stderr! }).on('line', (line) => {
    stderr.push(line);
    if (stderr.length > STDERR_LINES) stderr.shift();
  });
  const kill = async (err: unknown): Promise<never> => {
    child.kill('SIGKILL');
    await exited;
    throw err;
  };
  const failed = (why: string) =>
    new VfioError(
      'ERR_DEMO_HOST',
      `host ${name} ${why}${stderr.length ? `:\n  ${stderr.join('\n  ')}` : ''}`,
    );

  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(failed(`did not start listening in ${options.startTimeoutMs ?? 15_000} ms`)),
      options.startTimeoutMs ?? 15_000,
    );
    createInterface({ input: child.stdout! }).on('line', (line) => {
      let event: { event?: unknown; port?: unknown };
      try {
        event = JSON.parse(line) as typeof event;
      } catch {
        return;
      }
      if (event.event === 'listening' && typeof event.port === 'number') {
        clearTimeout(timer);
        resolve(event.port);
      }
    });
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(failed(`could not be started (${err.message})`));
    });
    void exited.then(() => {
      clearTimeout(timer);
      reject(failed(`exited (code ${child.exitCode ?? child.signalCode}) before listening`));
    });
  }).catch(kill);

  const address = parseTcpAddress(`127.0.0.1:${port}`);
  let api: ReturnType<typeof connectHost>;
  try {
    api = connectHost(address);
  } catch (err) {
    return kill(err);
  }
  let shutdown: Promise<void> | undefined;
  return {
    address: formatAddress(address),
    api,
    shutdown: () =>
      (shutdown ??= (async () => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        // The host stops and destroys its VMs; it is already gone if this fails.
        await api.shutdown().catch(() => {});
        const timer = setTimeout(() => child.kill('SIGKILL'), options.exitTimeoutMs ?? 10_000);
        await exited;
        clearTimeout(timer);
      })()),
  };
}
