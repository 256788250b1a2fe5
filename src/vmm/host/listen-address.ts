import { lstat, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { invalidArgument } from '../../uapi/error.js';
import { HostErrorCode, hostError } from './host-errors.js';
import { SAFE_NAME, SAFE_NAME_TEXT } from './vm-definition.js';

/** Where a host's control server listens: a UNIX socket, or loopback TCP. */
export type ListenAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: '127.0.0.1'; port: number };

/** sun_path holds 108 bytes with the terminating NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;

/** The default control socket of host `name`: `softvfio-NAME.sock` in the OS temp directory. */
export function defaultSocketPath(name: string): string {
  if (typeof name !== 'string' || !SAFE_NAME.test(name)) {
    throw invalidArgument(`host name ${JSON.stringify(name)}: ${SAFE_NAME_TEXT}`);
  }
  return join(tmpdir(), `softvfio-${name}.sock`);
}

/** A UNIX socket address; ERR_BAD_ADDRESS when the path cannot be one. */
export function unixAddress(path: string): ListenAddress {
  if (typeof path !== 'string' || path.length === 0 || path.includes('\0')) {
    throw hostError(HostErrorCode.BAD_ADDRESS, `socket path ${JSON.stringify(path)} is not a path`);
  }
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES) {
    throw hostError(
      HostErrorCode.BAD_ADDRESS,
      `socket path ${path} is ${Buffer.byteLength(path)} bytes, more than a UNIX socket takes (${MAX_SOCKET_PATH_BYTES})`,
    );
  }
  return { kind: 'unix', path };
}

/**
 * `HOST:PORT` for loopback TCP: HOST is 127.0.0.1 or localhost (the control API has no
 * authentication, so it never listens beyond the machine), PORT 0-65535 (0: any free port).
 */
export function parseTcpAddress(text: string): ListenAddress {
  const m = typeof text === 'string' ? /^(127\.0\.0\.1|localhost):(\d{1,5})$/.exec(text) : null;
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) {
    throw hostError(
      HostErrorCode.BAD_ADDRESS,
      `${JSON.stringify(text)} is not a loopback address: expected 127.0.0.1:PORT or localhost:PORT, PORT 0-65535`,
    );
  }
  return { kind: 'tcp', host: '127.0.0.1', port };
}

/** `unix:/tmp/softvfio-a.sock`, `tcp:127.0.0.1:7000`. */
export function formatAddress(address: ListenAddress): string {
  return address.kind === 'unix' ? `unix:${address.path}` : `tcp:${address.host}:${address.port}`;
}

/** Whether something accepts connections on the UNIX socket at `path` (1 s to answer). */
function probeSocket(path: string): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const socket = connect({ path });
    const done = (live: boolean | Error) => {
      clearTimeout(timer);
      socket.destroy();
      if (live instanceof Error) reject(live);
      else resolve(live);
    };
    const timer = setTimeout(() => done(true), 1000);
    socket.once('connect', () => done(true));
    socket.once('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ECONNREFUSED' || err.code === 'ENOENT') done(false);
      else done(hostError(HostErrorCode.BAD_ADDRESS, `cannot probe socket ${path}: ${err.message}`));
    });
  });
}

/**
 * Make `path` free for a new listening socket: nothing there, or a stale socket file (nobody
 * accepts on it) which is removed. ERR_HOST_RUNNING when a live server listens there;
 * ERR_BAD_ADDRESS when the path is something else than a socket (it is never removed).
 */
export async function claimSocketPath(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = (await lstat(path)).isSocket();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw hostError(HostErrorCode.BAD_ADDRESS, `cannot use socket path ${path}: ${(err as Error).message}`);
  }
  if (!isSocket) {
    throw hostError(HostErrorCode.BAD_ADDRESS, `${path} exists and is not a socket; not touching it`);
  }
  if (await probeSocket(path)) {
    throw hostError(HostErrorCode.HOST_RUNNING, `a host is already listening on ${path}`);
  }
  try {
    await unlink(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw hostError(
        HostErrorCode.BAD_ADDRESS,
        `cannot remove the stale socket ${path}: ${(err as Error).message}`,
      );
    }
  }
}
