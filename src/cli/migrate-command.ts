import { type Command, InvalidArgumentError } from 'commander';
import { invalidArgument, VfioError } from '../uapi/error.js';
import { toJson } from '../vmm/host/control-protocol.js';
import { parseByteValue } from '../vmm/host/sizes.js';
import { isFinalStatus, type MigrationInfo } from '../vmm/migration/migration-info.js';
import {
  INCOMING_PARAMETER_NAMES,
  type IncomingParameters,
  type MigrationParameters,
  parseMigrationSettings,
  resolveIncomingParameters,
} from '../vmm/migration/migration-params.js';
import {
  Exit,
  hostTargetOptions,
  reportError,
  safeName,
  type TargetOptions,
  targetAddress,
} from './cli-common.js';
import type { HostCommandIo } from './host-command.js';
import { parseMigrationUri } from '../vmm/migration/migration-uri.js';
import { connectHost, type MigrationHostApi } from './migration-api.js';
import {
  jsonLinesView,
  type MigrationView,
  progressView,
  renderMigrationSummary,
} from './migration-output.js';

/** What the migration commands need from their process. */
export interface MigrationIo extends HostCommandIo {
  /** Is stderr a terminal? Then progress bars and tables, else JSON lines. */
  isTTY: boolean;
  /** Where progress bars are drawn (stderr). */
  progressStream: NodeJS.WritableStream;
}

export const DEFAULT_INCOMING_LISTEN = '127.0.0.1:0';

/** `--listen`: where the destination waits, `HOST:PORT` (port 0: any free port). */
export function listenOption(value: string): string {
  try {
    parseMigrationUri(`tcp:${value}`, { allowPortZero: true });
  } catch {
    throw new InvalidArgumentError('expected HOST:PORT, such as 127.0.0.1:0 (PORT 0-65535)');
  }
  return value;
}

/** `--to`: the URI `incoming` printed, `tcp:HOST:PORT`. */
export function migrationUriOption(value: string): string {
  try {
    parseMigrationUri(value);
  } catch {
    throw new InvalidArgumentError('expected tcp:HOST:PORT, as printed by softvfio incoming (PORT 1-65535)');
  }
  return value;
}

const collect = (value: string, previous: string[] = []) => [...previous, value];

/**
 * Parse destination settings (`-p x-migration-max-queued-buffers-size=64MiB`): QEMU's names, sizes
 * in bytes or with a binary unit; ERR_INVALID_ARGUMENT naming the setting otherwise.
 */
export function parseIncomingSettings(settings: readonly string[]): Partial<IncomingParameters> {
  const keys = Object.keys(INCOMING_PARAMETER_NAMES) as (keyof IncomingParameters)[];
  const out: Partial<IncomingParameters> = {};
  for (const setting of settings) {
    const eq = setting.indexOf('=');
    const name = eq < 0 ? setting : setting.slice(0, eq);
    const key = keys.find((k) => INCOMING_PARAMETER_NAMES[k] === name);
    if (key === undefined) {
      const known = keys.map((k) => INCOMING_PARAMETER_NAMES[k]).join(', ');
      throw invalidArgument(`unknown incoming migration parameter ${JSON.stringify(name)} (known: ${known})`);
    }
    const bytes = eq < 0 ? undefined : parseByteValue(setting.slice(eq + 1));
    if (bytes === undefined || bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalidArgument(`${name} takes a size such as 67108864 or 64MiB, got ${JSON.stringify(setting)}`);
    }
    out[key] = Number(bytes);
  }
  resolveIncomingParameters(out);
  return out;
}

/** What a signal asks of a command that follows a migration. */
export interface FollowSignals {
  /** Aborted on the first SIGINT/SIGTERM: cancel the migration (once) and follow it to its end. */
  cancel?: AbortSignal;
  /** Aborted on the second: stop following at once. */
  stop?: AbortSignal;
}

/**
 * Turn SIGINT/SIGTERM into FollowSignals while a command follows a migration. `firstDoes` says
 * what the first signal does, for the message.
 */
export function watchSignals(
  io: MigrationIo,
  firstDoes: () => string = () => 'cancelling the migration',
): Required<FollowSignals> & { dispose: () => void } {
  const cancel = new AbortController();
  const stop = new AbortController();
  const dispose = io.onSignals((signal) => {
    if (!cancel.signal.aborted) {
      io.err(`${signal}: ${firstDoes()} (${signal} again to stop waiting)`);
      cancel.abort();
    } else if (!stop.signal.aborted) {
      io.err(`${signal}: not waiting any longer`);
      stop.abort();
    }
  });
  return { cancel: cancel.signal, stop: stop.signal, dispose };
}

/** Run `action` on the first abort of `signal` (at once if it is aborted); returns the remover. */
function onAbort(signal: AbortSignal | undefined, action: () => void): () => void {
  if (signal === undefined) return () => {};
  if (signal.aborted) {
    action();
    return () => {};
  }
  signal.addEventListener('abort', action, { once: true });
  return () => signal.removeEventListener('abort', action);
}

/**
 * Show the events of `vm`'s migration until it ends and return the final report. A cancel
 * request calls cancelMigration once and keeps following; a stop request gives up (ERR_ABORTED).
 * Should the event stream break or end early, the host is asked once for the migration's state:
 * a final one is the report, else the stream's error stands.
 */
export async function followMigration(
  api: MigrationHostApi,
  vm: string,
  view: MigrationView,
  signals: FollowSignals,
  io: MigrationIo,
): Promise<MigrationInfo> {
  const listeners: (() => void)[] = [];
  const stopped = new Promise<never>((_resolve, reject) => {
    listeners.push(
      onAbort(signals.stop, () =>
        reject(new VfioError('ERR_ABORTED', `stopped following the migration of VM ${vm} before it ended`)),
      ),
    );
  });
  // Raced below; this keeps a rejection before the first race from counting as unhandled.
  stopped.catch(() => {});
  listeners.push(
    onAbort(signals.cancel, () => {
      api.cancelMigration(vm).then(
        () => {},
        (err: unknown) => io.err(`cannot cancel the migration of VM ${vm}: ${(err as Error).message}`),
      );
    }),
  );
  const events = api.migrationEvents(vm, signals.stop === undefined ? {} : { signal: signals.stop });
  const iterator = events[Symbol.asyncIterator]();
  try {
    let streamError: unknown;
    try {
      for (;;) {
        const next = await Promise.race([iterator.next(), stopped]);
        if (next.done) break;
        view.event(next.value);
        if (next.value.type === 'end') return next.value.info;
      }
    } catch (err) {
      if (signals.stop?.aborted) throw err;
      streamError = err;
    }
    const info = await api.queryMigration(vm).catch(() => undefined);
    if (info !== undefined && isFinalStatus(info.status)) {
      view.event({ type: 'end', info });
      return info;
    }
    throw (
      streamError ??
      new VfioError(
        'ERR_MIGRATION_EVENTS',
        `the events of VM ${vm} ended before its migration did (status ${info?.status ?? 'unknown'})`,
      )
    );
  } finally {
    // Unlistened, `stopped` can never reject; the iterator is told we are done (not awaited: an
    // iterator stuck in next() finishes its return only after that next()).
    for (const off of listeners) off();
    void iterator.return?.()?.catch(() => {});
    view.close();
  }
}

export interface IncomingOptions extends TargetOptions {
  vm: string;
  listen?: string;
  param?: string[];
  json?: boolean;
  wait?: boolean;
  /** Leave the VM stopped after the hand-off (QEMU's -S); `vm start` runs it. */
  paused?: boolean;
}

export interface MigrateOptions extends TargetOptions {
  vm: string;
  to: string;
  param?: string[];
  json?: boolean;
  detach?: boolean;
}

/*
 * Output: a command that only starts something prints text unless --json; a command that follows
 * a migration prints JSON lines unless it runs on a terminal without --json. Errors before the
 * migration is followed are reported as every command reports them; after, on stderr only, so that
 * stdout stays one JSON document per line.
 */
interface OutputMode {
  json: boolean;
  jsonLines: boolean;
}

/**
 * Run `start`, then (with `follow`) follow the migration to its end, shown as JSON lines or as
 * progress bars and a summary table, SIGINT cancelling it. Exit 0 when it completed, 1 when it
 * failed or was cancelled, the error's code when something throws.
 */
async function startAndFollow(
  command: 'incoming' | 'migrate',
  api: MigrationHostApi,
  vm: string,
  io: MigrationIo,
  { json, jsonLines, follow }: OutputMode & { follow: boolean },
  start: () => Promise<void>,
): Promise<number> {
  // Watched before the start, so that a Ctrl-C while it runs cancels what it started.
  const signals = follow ? watchSignals(io) : undefined;
  try {
    try {
      await start();
    } catch (err) {
      return reportError(io, command, json, err);
    }
    if (signals === undefined) return Exit.OK;
    let info: MigrationInfo;
    try {
      const view = jsonLines ? jsonLinesView(io) : progressView(io.progressStream);
      info = await followMigration(api, vm, view, signals, io);
    } catch (err) {
      return reportError(io, command, false, err);
    }
    if (!jsonLines) io.out(renderMigrationSummary(info));
    if (info.status === 'completed') return Exit.OK;
    if (!jsonLines) {
      const why = info.error ? `: ${info.error.message}` : '';
      io.err(`softvfio ${command}: the migration of VM ${vm} ${info.status}${why}`);
    }
    return Exit.FAILED;
  } finally {
    signals?.dispose();
  }
}

/**
 * `softvfio incoming`: make a created VM wait for a migration; print the URI for `migrate`.
 * With `wait`, follow the incoming migration to its end.
 */
export function incomingCommand(
  api: MigrationHostApi,
  options: IncomingOptions,
  io: MigrationIo,
): Promise<number> {
  const json = options.json ?? false;
  const wait = options.wait ?? false;
  const jsonLines = json || (wait && !io.isTTY);
  return startAndFollow('incoming', api, options.vm, io, { json, jsonLines, follow: wait }, async () => {
    const params = parseIncomingSettings(options.param ?? []);
    const { uri, info } = await api.incoming(options.vm, {
      uri: `tcp:${options.listen ?? DEFAULT_INCOMING_LISTEN}`,
      params,
      ...(options.paused ? { autostart: false } : {}),
    });
    io.out(jsonLines ? toJson({ event: 'incoming', vm: options.vm, uri, info }) : uri);
  });
}

/**
 * `softvfio migrate`: start migrating a running VM to the URI `incoming` printed and follow it
 * to its end (or only start it, with `detach`).
 */
export function migrateCommand(
  api: MigrationHostApi,
  options: MigrateOptions,
  io: MigrationIo,
): Promise<number> {
  const json = options.json ?? false;
  const detach = options.detach ?? false;
  const jsonLines = json || (!detach && !io.isTTY);
  return startAndFollow('migrate', api, options.vm, io, { json, jsonLines, follow: !detach }, async () => {
    const params: Partial<MigrationParameters> = parseMigrationSettings(options.param ?? []);
    const info = await api.migrate(options.vm, { uri: options.to, params });
    if (jsonLines) io.out(toJson({ event: 'migrate', vm: options.vm, uri: options.to, params, info }));
    else if (detach) io.out(`migrating VM ${options.vm} to ${options.to} (status ${info.status})`);
  });
}

/** Run `command` against the host its options name; a bad target is reported like any error. */
async function onHost<O extends TargetOptions & { json?: boolean }>(
  name: string,
  options: O,
  io: MigrationIo,
  command: (api: MigrationHostApi, options: O, io: MigrationIo) => Promise<number>,
): Promise<number> {
  let api: MigrationHostApi;
  try {
    api = connectHost(targetAddress(options));
  } catch (err) {
    return reportError(io, name, options.json ?? false, err);
  }
  return command(api, options, io);
}

export function registerMigrationCommands(
  program: Command,
  io: MigrationIo,
  setExit: (code: number) => void,
): void {
  hostTargetOptions(
    program
      .command('incoming')
      .description('make a created VM wait for an incoming live migration; print the URI to migrate to')
      .requiredOption('--vm <name>', 'the VM (created on this host, not started)', safeName)
      .option(
        '--listen <host:port>',
        'where to listen for the migration',
        listenOption,
        DEFAULT_INCOMING_LISTEN,
      )
      .option(
        '--paused',
        'leave the VM stopped after the hand-off (QEMU -S); start it with softvfio vm start',
      )
      .option(
        '-p, --param <name=value>',
        'a destination setting: x-migration-max-queued-buffers-size=SIZE (repeatable)',
        collect,
      )
      .option('--wait', 'then follow the migration to its end (exit 0 completed, 1 failed)')
      .option('--json', 'print JSON lines instead of text'),
  ).action(async (options: IncomingOptions) =>
    setExit(await onHost('incoming', options, io, incomingCommand)),
  );
  hostTargetOptions(
    program
      .command('migrate')
      .description('live-migrate a running VM to a destination waiting with softvfio incoming')
      .requiredOption('--vm <name>', 'the VM (running on this host)', safeName)
      .requiredOption(
        '--to <uri>',
        'the destination, tcp:HOST:PORT as printed by softvfio incoming',
        migrationUriOption,
      )
      .option(
        '-p, --param <name=value>',
        'a migration parameter or capability by its QEMU name: downtime-limit=300, multifd-channels=4, ' +
          'auto-converge=on, … (repeatable)',
        collect,
      )
      .option('--detach', 'only start the migration')
      .option('--json', 'print JSON lines (one per event, the final report last) instead of progress bars'),
  ).action(async (options: MigrateOptions) => setExit(await onHost('migrate', options, io, migrateCommand)));
}
