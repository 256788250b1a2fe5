import { invalidArgument } from '../../uapi/error.js';

/** Most characters of a host name in a migration URI. */
const MAX_HOST = 253;

/**
 * Parse a migration URI as QEMU writes it: `tcp:HOST:PORT` (HOST a name or an IPv4 address,
 * PORT 1..65535; a destination listens on `tcp:HOST:0` to have a port picked).
 */
export function parseMigrationUri(
  uri: string,
  options: { allowPortZero?: boolean } = {},
): { host: string; port: number } {
  const match = /^tcp:([A-Za-z0-9.-]{1,253}):(\d{1,5})$/.exec(uri);
  const port = match === null ? NaN : Number(match[2]);
  const min = options.allowPortZero ? 0 : 1;
  if (match === null || match[1]!.length > MAX_HOST || !(port >= min && port <= 65535)) {
    throw invalidArgument(
      `migration URI ${JSON.stringify(uri)} is not tcp:HOST:PORT with a port from ${min} to 65535`,
    );
  }
  return { host: match[1]!, port };
}

export function formatMigrationUri(address: { host: string; port: number }): string {
  return `tcp:${address.host}:${address.port}`;
}
