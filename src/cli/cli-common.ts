import { type Command, InvalidArgumentError } from 'commander';
import { HostErrorCode } from '../vmm/host/host-errors.js';
import { ControlError } from '../vmm/host/control-client.js';
import { errorBody, toJson } from '../vmm/host/control-protocol.js';
import {
  defaultSocketPath,
  type ListenAddress,
  parseTcpAddress,
  unixAddress,
} from '../vmm/host/listen-address.js';
import { parseByteValue } from '../vmm/host/sizes.js';
import { SAFE_NAME, SAFE_NAME_TEXT } from '../vmm/host/vm-definition.js';
import { VfioError } from '../uapi/error.js';
import type { CommandIo } from './conform-command.js';
import { renderErrorDetails } from './vm-output.js';

/** Exit codes of `softvfio host` and `softvfio vm`. */
export const Exit = {
  OK: 0,
  /** The operation failed: a VM refused to start, a wrong state, a host budget, a host error. */
  FAILED: 1,
  /** Bad input: options, the definition file, an unknown VM, no host listening. */
  USAGE: 2,
} as const;

export function safeName(value: string): string {
  if (!SAFE_NAME.test(value)) throw new InvalidArgumentError(SAFE_NAME_TEXT);
  return value;
}

export function positiveInt(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < 1) {
    throw new InvalidArgumentError('expected an integer >= 1');
  }
  return n;
}

export function byteSize(value: string): number {
  const n = parseByteValue(value);
  if (n === undefined || n < 1n || n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new InvalidArgumentError('expected a size such as 8GiB, 512MiB or a byte count');
  }
  return Number(n);
}

/** How a `vm` command finds its host: exactly one of these, default `--host default`. */
export interface TargetOptions {
  host?: string;
  socket?: string;
  connect?: string;
}

/** The options that name a command's host (see targetAddress). */
export function hostTargetOptions(cmd: Command): Command {
  return cmd
    .option('--host <name>', 'the host named NAME, on its default socket (default: "default")', safeName)
    .option('--socket <path>', 'the host listening on this UNIX socket')
    .option('--connect <host:port>', 'the host listening on this loopback TCP address');
}

/** The control address the options name; a usage error (VfioError) when they do not name one. */
export function targetAddress(options: TargetOptions): ListenAddress {
  const given = [options.host, options.socket, options.connect].filter((x) => x !== undefined);
  if (given.length > 1) {
    throw new VfioError('ERR_USAGE', 'give one of --host NAME, --socket PATH and --connect HOST:PORT');
  }
  if (options.socket !== undefined) return unixAddress(options.socket);
  if (options.connect !== undefined) return parseTcpAddress(options.connect);
  return unixAddress(defaultSocketPath(options.host ?? 'default'));
}

/** Exit code of an error: bad input (2) or a failed operation (1). */
export function exitCodeOf(err: VfioError): number {
  if (err instanceof ControlError) {
    return [400, 404, 405, 413, 415].includes(err.httpStatus) ? Exit.USAGE : Exit.FAILED;
  }
  const usage: string[] = [
    'ERR_USAGE',
    'ERR_VM_DEFINITION',
    'ERR_INVALID_ARGUMENT',
    HostErrorCode.NO_HOST,
    HostErrorCode.BAD_ADDRESS,
    HostErrorCode.BODY_TOO_LARGE,
  ];
  return usage.includes(err.code) ? Exit.USAGE : Exit.FAILED;
}

/**
 * Report an error of `command`: with --json the error body on stdout, else the message and the
 * error's numbers on stderr. Returns the exit code. Anything not a VfioError is a bug: rethrown.
 */
export function reportError(io: CommandIo, command: string, json: boolean, err: unknown): number {
  if (!(err instanceof VfioError)) throw err;
  if (json) {
    const body = errorBody(err);
    if (err instanceof ControlError && err.details !== undefined) body.error.details = err.details;
    io.out(toJson(body, 2));
  } else {
    io.err(`softvfio ${command}: ${err.message}`);
    const details = err instanceof ControlError ? err.details : errorBody(err).error.details;
    for (const line of renderErrorDetails(err.code, details)) io.err(`  ${line}`);
  }
  return exitCodeOf(err);
}
