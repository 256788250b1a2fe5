import type { Command } from 'commander';
import { VfioError } from '../uapi/error.js';
import { runSoftwareHost } from '../vmm/host/host-process.js';
import {
  defaultSocketPath,
  formatAddress,
  type ListenAddress,
  parseTcpAddress,
  unixAddress,
} from '../vmm/host/listen-address.js';
import type { HostLogger, LogFields } from '../vmm/host/logger.js';
import { toJson } from '../vmm/host/control-protocol.js';
import { byteSize, Exit, positiveInt, reportError, safeName } from './cli-common.js';
import type { CommandIo } from './conform-command.js';

export interface HostCommandOptions {
  name: string;
  socket?: string;
  listen?: string;
  json?: boolean;
  maxVms?: number;
  maxMemory?: number;
  dmaEntryLimit?: number;
}

/** What the host command needs from its process: output, and the signals that stop it. */
export interface HostCommandIo extends CommandIo {
  /** Calls `onSignal` with the signal's name on SIGINT/SIGTERM; returns the function that stops listening. */
  onSignals: (onSignal: (signal: string) => void) => () => void;
}

function makeLogger(io: CommandIo, name: string, json: boolean): HostLogger {
  const line = (level: string, message: string, fields?: LogFields) =>
    io.err(
      json
        ? toJson({ time: new Date().toISOString(), level, host: name, message, ...fields })
        : `[host ${name}] ${level === 'info' ? '' : `${level}: `}${message}`,
    );
  return {
    info: (m, f) => line('info', m, f),
    warn: (m, f) => line('warn', m, f),
    error: (m, f) => line('error', m, f),
  };
}

/**
 * `softvfio host`: run one software host until SIGINT/SIGTERM or POST /shutdown, then stop and
 * destroy its VMs, remove the socket and return 0 (1 if a VM could not be torn down cleanly).
 */
export async function hostCommand(options: HostCommandOptions, io: HostCommandIo): Promise<number> {
  const json = options.json ?? false;
  let address: ListenAddress;
  try {
    if (options.socket !== undefined && options.listen !== undefined) {
      throw new VfioError('ERR_USAGE', 'give --socket PATH or --listen HOST:PORT, not both');
    }
    address =
      options.listen !== undefined
        ? parseTcpAddress(options.listen)
        : unixAddress(options.socket ?? defaultSocketPath(options.name));
  } catch (err) {
    return reportError(io, 'host', json, err);
  }

  const abort = new AbortController();
  let signals = 0;
  const stopListening = io.onSignals((signal) => {
    signals++;
    if (signals === 1) {
      io.err(json ? toJson({ event: 'signal', signal }) : `[host ${options.name}] ${signal}: shutting down`);
      abort.abort(new VfioError('ERR_ABORTED', `${signal}`));
    } else {
      io.err(`[host ${options.name}] ${signal} again: exiting without cleaning up`);
      process.exit(Exit.FAILED);
    }
  });
  try {
    const running = await runSoftwareHost({
      name: options.name,
      address,
      signal: abort.signal,
      logger: makeLogger(io, options.name, json),
      ...(options.maxVms === undefined ? {} : { maxVms: options.maxVms }),
      ...(options.maxMemory === undefined ? {} : { maxMemoryBytes: options.maxMemory }),
      ...(options.dmaEntryLimit === undefined
        ? {}
        : { kernel: { modules: { vfioIommuType1: { dmaEntryLimit: options.dmaEntryLimit } } } }),
    });
    const where = running.address;
    io.out(
      json
        ? toJson({
            event: 'listening',
            name: options.name,
            address: formatAddress(where),
            ...(where.kind === 'unix' ? { socket: where.path } : { host: where.host, port: where.port }),
            pid: process.pid,
          })
        : `softvfio host ${options.name} listening on ${formatAddress(where)} (pid ${process.pid})`,
    );
    const report = await running.done;
    io.out(
      json
        ? toJson({
            event: 'stopped',
            name: options.name,
            destroyed: report.destroyed,
            errors: report.errors.map((e) => ({ code: e.code, message: e.message })),
          })
        : `softvfio host ${options.name} stopped: ${report.destroyed.length} VM(s) destroyed` +
            report.errors.map((e) => `\n  error: ${e.message}`).join(''),
    );
    const code = report.errors.length === 0 ? Exit.OK : Exit.FAILED;
    // Everything is closed: the process ends by itself. Should a handle linger, do not hang.
    setTimeout(() => {
      io.err(`[host ${options.name}] still running 5 s after shutdown: exiting`);
      process.exit(code);
    }, 5_000).unref();
    return code;
  } catch (err) {
    const code = reportError(io, 'host', json, err);
    // The address was well formed; a host already there or a path that cannot be used is a failure.
    return code === Exit.USAGE && err instanceof VfioError && err.code !== 'ERR_USAGE' ? Exit.FAILED : code;
  } finally {
    stopListening();
  }
}

export function registerHostCommand(
  program: Command,
  io: HostCommandIo,
  setExit: (code: number) => void,
): void {
  program
    .command('host')
    .description('run a software host (kernel model and VMs) with its control API, until SIGINT/SIGTERM')
    .option('--name <name>', 'host name (names the default socket)', safeName, 'default')
    .option('--socket <path>', 'control socket (default: softvfio-NAME.sock in the temp directory)')
    .option('--listen <host:port>', 'listen on loopback TCP instead (127.0.0.1 only; port 0 picks one)')
    .option('--json', 'print events as JSON lines')
    .option('--max-vms <n>', 'most VMs at once (default 64)', positiveInt)
    .option('--max-memory <size>', 'memory the VMs may take together (default: physical memory)', byteSize)
    .option('--dma-entry-limit <n>', 'vfio_iommu_type1.dma_entry_limit (default 65535)', positiveInt)
    .action(async (options: HostCommandOptions) => {
      setExit(await hostCommand(options, io));
    });
}

/** The real process's signals. */
export function processSignals(onSignal: (signal: string) => void): () => void {
  const handler = (signal: NodeJS.Signals) => onSignal(signal);
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return () => {
    process.off('SIGINT', handler);
    process.off('SIGTERM', handler);
  };
}
