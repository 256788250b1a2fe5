import { chmod, lstat, unlink } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { isMainThread } from 'node:worker_threads';
import { z } from 'zod';
import { VfioError } from '../../uapi/error.js';
import { errorBody, httpStatusOf, MAX_REQUEST_BODY_BYTES, toJson } from './control-protocol.js';
import { HostErrorCode, hostError } from './host-errors.js';
import { claimSocketPath, formatAddress, type ListenAddress } from './listen-address.js';
import { type HostLogger, silentLogger } from './logger.js';
import type { SoftwareHost } from './software-host.js';
import { SAFE_NAME, SAFE_NAME_TEXT } from './vm-definition.js';

export interface ControlServerOptions {
  /** Request body limit, checked before anything is buffered; default MAX_REQUEST_BODY_BYTES (1 MiB). */
  maxBodyBytes?: number;
  /** Open connections at most (each buffers at most one body); default 32. */
  maxConnections?: number;
  /** Time to receive a whole request; default 30 s. */
  requestTimeoutMs?: number;
  logger?: HostLogger;
  /** POST /shutdown was accepted (its 202 is on its way): the owner shuts the host down. */
  onShutdownRequest?: () => void;
}

type Method = 'GET' | 'POST' | 'DELETE';
/** What a route takes as a body: a VM definition, or nothing (no body or `{}`). */
type BodyKind = 'json' | 'none';

type Route = RouteBase &
  (
    | { run: (params: { name: string }, body: unknown) => Promise<[number, unknown]> | [number, unknown] }
    /** A streaming route answers itself (NDJSON) instead of returning a value. */
    | { stream: (params: { name: string }, req: IncomingMessage, res: ServerResponse) => void }
  );

interface RouteBase {
  method: Method;
  /** Path segments; ':name' is a VM name. */
  path: readonly string[];
  body: BodyKind;
  /** Errors of this route are a VM refusing to start (422) unless they are the host's own. */
  during?: 'start';
}

const parameterValues = z.record(z.string().max(64), z.union([z.number(), z.boolean()]));
const incomingBody = z.strictObject({
  uri: z.string().max(300).optional(),
  params: parameterValues.optional(),
  autostart: z.boolean().optional(),
  prealloc: z.boolean().optional(),
});
const migrateBody = z.strictObject({ uri: z.string().max(300), params: parameterValues.optional() });

/** A request body checked against its schema: ERR_BAD_REQUEST naming the first issue. */
function checked<S extends z.ZodType>(schema: S, body: unknown): z.output<S> {
  const result = schema.safeParse(body ?? {});
  if (!result.success) {
    const issue = result.error.issues[0]!;
    throw hostError(HostErrorCode.BAD_REQUEST, `${issue.path.join('.') || 'body'}: ${issue.message}`);
  }
  return result.data;
}

const emptyBody = z.strictObject({});
const JSON_MEDIA_TYPE = /^application\/json\s*(;\s*charset\s*=\s*"?utf-8"?\s*)?$/i;
/** Above this much announced body, an oversized request's connection is closed instead of drained. */
const DRAIN_LIMIT_FACTOR = 16;

/**
 * The control server of a software host: HTTP/1.1 on a UNIX socket (mode 0600, a stale socket file
 * replaced, a live one refused) or on 127.0.0.1. Routes and bodies are in control-protocol.ts; every
 * request is checked (method, path, VM name, query, Origin and Host headers, content type, body size
 * before buffering, JSON, schema) and every error answered as typed JSON.
 */
export class ControlServer {
  readonly host: SoftwareHost;
  readonly #server: Server;
  readonly #routes: Route[];
  readonly #logger: HostLogger;
  readonly #maxBodyBytes: number;
  readonly #onShutdownRequest: (() => void) | undefined;
  #address: ListenAddress | undefined;
  #socketIno: number | undefined;
  #closing: Promise<void> | undefined;

  private constructor(host: SoftwareHost, options: ControlServerOptions) {
    this.host = host;
    this.#logger = options.logger ?? silentLogger;
    this.#maxBodyBytes = options.maxBodyBytes ?? MAX_REQUEST_BODY_BYTES;
    this.#onShutdownRequest = options.onShutdownRequest;
    this.#routes = this.#makeRoutes();
    this.#server = createServer(
      { requestTimeout: options.requestTimeoutMs ?? 30_000, headersTimeout: 10_000 },
      (req, res) => {
        void this.#handle(req, res);
      },
    );
    this.#server.maxConnections = options.maxConnections ?? 32;
    this.#server.maxHeadersCount = 64;
    this.#server.keepAliveTimeout = 5_000;
  }

  /** Listen at `address`; ERR_HOST_RUNNING if a live host has the socket, ERR_BAD_ADDRESS if it cannot. */
  static async listen(
    host: SoftwareHost,
    address: ListenAddress,
    options: ControlServerOptions = {},
  ): Promise<ControlServer> {
    const server = new ControlServer(host, options);
    await server.#listen(address);
    return server;
  }

  /** Where it listens (with the port TCP picked). */
  get address(): ListenAddress {
    return this.#address!;
  }

  /**
   * Stop listening, let requests in flight finish (at most `graceMs`, default 5 s, then their
   * connections are cut) and remove the socket file.
   */
  close(graceMs = 5_000): Promise<void> {
    this.#closing ??= (async () => {
      const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
      this.#server.closeIdleConnections();
      const timer = setTimeout(() => this.#server.closeAllConnections(), graceMs);
      timer.unref();
      await closed;
      clearTimeout(timer);
      await this.#removeSocket();
      this.#logger.info(`control server closed (${formatAddress(this.#address!)})`);
    })();
    return this.#closing;
  }

  async #listen(address: ListenAddress): Promise<void> {
    if (address.kind === 'unix') await claimSocketPath(address.path);
    await new Promise<void>((resolve, reject) => {
      const failed = (err: NodeJS.ErrnoException) => {
        const where = formatAddress(address);
        reject(
          err.code === 'EADDRINUSE' && address.kind === 'unix'
            ? hostError(HostErrorCode.HOST_RUNNING, `a host is already listening on ${address.path}`)
            : hostError(HostErrorCode.BAD_ADDRESS, `cannot listen on ${where}: ${err.message}`),
        );
      };
      this.#server.once('error', failed);
      this.#server.once('listening', () => {
        this.#server.off('error', failed);
        this.#server.on('error', (err) => this.#logger.error(`control server: ${err.message}`));
        resolve();
      });
      if (address.kind === 'unix' && isMainThread) {
        // The socket is born 0600: the API has no authentication, the file mode is the access check.
        const umask = process.umask(0o177);
        try {
          this.#server.listen(address.path);
        } finally {
          process.umask(umask);
        }
      } else if (address.kind === 'unix') {
        this.#server.listen(address.path); // workers cannot set the umask: chmod below
      } else {
        this.#server.listen(address.port, address.host);
      }
    });
    if (address.kind === 'unix') {
      this.#address = address;
      await chmod(address.path, 0o600);
      this.#socketIno = (await lstat(address.path)).ino;
    } else {
      const port = (this.#server.address() as AddressInfo).port;
      this.#address = { kind: 'tcp', host: '127.0.0.1', port };
    }
    this.#logger.info(`control server listening on ${formatAddress(this.#address)}`);
  }

  /** Remove the socket file if it is still the one this server made (Node usually has already). */
  async #removeSocket(): Promise<void> {
    const address = this.#address;
    if (address?.kind !== 'unix') return;
    try {
      if ((await lstat(address.path)).ino === this.#socketIno) await unlink(address.path);
    } catch {
      // gone already
    }
  }

  #makeRoutes(): Route[] {
    const host = this.host;
    return [
      { method: 'GET', path: ['host'], body: 'none', run: () => [200, host.info()] },
      {
        method: 'POST',
        path: ['shutdown'],
        body: 'none',
        run: () => {
          if (this.#onShutdownRequest === undefined) {
            throw hostError(HostErrorCode.NO_ROUTE, 'this server does not take shutdown requests');
          }
          setImmediate(this.#onShutdownRequest);
          return [202, { name: host.name, shuttingDown: true }];
        },
      },
      { method: 'GET', path: ['vms'], body: 'none', run: () => [200, { vms: host.list() }] },
      { method: 'POST', path: ['vms'], body: 'json', run: (_p, body) => [201, host.createFromJson(body)] },
      { method: 'GET', path: ['vms', ':name'], body: 'none', run: (p) => [200, host.status(p.name)] },
      {
        method: 'DELETE',
        path: ['vms', ':name'],
        body: 'none',
        run: async (p) => {
          await host.destroy(p.name);
          return [200, { name: p.name, destroyed: true }];
        },
      },
      {
        method: 'POST',
        path: ['vms', ':name', 'start'],
        body: 'none',
        during: 'start',
        run: async (p) => [200, await host.start(p.name)],
      },
      {
        method: 'POST',
        path: ['vms', ':name', 'stop'],
        body: 'none',
        run: async (p) => [200, await host.stop(p.name)],
      },
      {
        method: 'GET',
        path: ['vms', ':name', 'digest'],
        body: 'none',
        run: (p) => [200, host.digest(p.name)],
      },
      {
        method: 'POST',
        path: ['vms', ':name', 'incoming'],
        body: 'json',
        during: 'start',
        run: async (p, body) => {
          const request = checked(incomingBody, body);
          return [200, await host.incoming(p.name, request as Parameters<typeof host.incoming>[1])];
        },
      },
      {
        method: 'POST',
        path: ['vms', ':name', 'migrate'],
        body: 'json',
        run: async (p, body) => {
          const request = checked(migrateBody, body);
          return [202, await host.migrate(p.name, request as Parameters<typeof host.migrate>[1])];
        },
      },
      {
        method: 'GET',
        path: ['vms', ':name', 'migration'],
        body: 'none',
        run: (p) => [200, host.queryMigration(p.name)],
      },
      {
        method: 'POST',
        path: ['vms', ':name', 'migration', 'cancel'],
        body: 'none',
        run: (p) => [200, host.cancelMigration(p.name)],
      },
      {
        method: 'GET',
        path: ['vms', ':name', 'migration', 'events'],
        body: 'none',
        stream: (p, req, res) => {
          // One JSON event per line until the migration's 'end' event (or the client leaves).
          let stop: () => void = () => undefined;
          const write = (event: unknown, last: boolean) => {
            if (res.writableEnded) return;
            if (!res.headersSent) {
              res.writeHead(200, { 'Content-Type': 'application/x-ndjson', 'Cache-Control': 'no-store' });
            }
            res.write(`${toJson(event)}\n`);
            if (last) res.end();
          };
          stop = host.watchMigration(p.name, (event) => write(event, event.type === 'end'));
          req.on('close', () => stop());
        },
      },
    ];
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let route: Route | undefined;
    try {
      this.#checkOrigin(req);
      const { segments, name } = parsePath(req.url ?? '');
      const matching = this.#routes.filter((r) => matches(r.path, segments));
      if (matching.length === 0) {
        throw hostError(
          HostErrorCode.NO_ROUTE,
          `no route ${req.method} ${segments.length ? '/' + segments.join('/') : '/'}`,
        );
      }
      route = matching.find((r) => r.method === req.method);
      if (route === undefined) {
        res.setHeader('Allow', matching.map((r) => r.method).join(', '));
        throw hostError(
          HostErrorCode.METHOD_NOT_ALLOWED,
          `${req.method} is not allowed here (${matching.map((r) => r.method).join(', ')})`,
        );
      }
      if (route.path.includes(':name')) checkName(name);
      const body = await this.#readBody(req, res, route.body);
      if ('stream' in route) {
        route.stream({ name: name ?? '' }, req, res);
        return;
      }
      const [status, value] = await route.run({ name: name ?? '' }, body);
      send(res, status, toJson(value));
    } catch (err) {
      const error =
        err instanceof VfioError
          ? err
          : new VfioError('ERR_INTERNAL', `internal error: ${String(err)}`, { cause: err });
      const status = httpStatusOf(error, route?.during);
      if (status >= 500 && status !== 503 && status !== 507) {
        this.#logger.error(`${req.method} ${req.url}: ${error.message}`, { code: error.code });
      }
      if (!res.headersSent) send(res, status, toJson(errorBody(error)));
      else res.destroy();
    }
  }

  /**
   * No browser pages (they send Origin): the API has no CSRF protection to offer. Over TCP the
   * Host header must name the loopback address (a DNS-rebound name must not reach the API).
   */
  #checkOrigin(req: IncomingMessage): void {
    if (req.headers.origin !== undefined) {
      throw hostError(HostErrorCode.FORBIDDEN, 'requests from web pages (with an Origin header) are refused');
    }
    const address = this.#address;
    if (address?.kind === 'tcp') {
      const allowed = [`127.0.0.1:${address.port}`, `localhost:${address.port}`];
      if (!allowed.includes(req.headers.host ?? '')) {
        throw hostError(
          HostErrorCode.FORBIDDEN,
          `Host ${JSON.stringify(req.headers.host ?? '')} is not this server`,
        );
      }
    }
  }

  /** The body: checked for type and size before buffering, parsed, and `{}` or nothing for 'none'. */
  #readBody(req: IncomingMessage, res: ServerResponse, kind: BodyKind): Promise<unknown> {
    const limit = this.#maxBodyBytes;
    const lengthHeader = req.headers['content-length'];
    const chunked = req.headers['transfer-encoding'] !== undefined;
    const announced = lengthHeader === undefined ? undefined : Number(lengthHeader);
    const hasBody = chunked || (announced !== undefined && announced > 0);
    if (!hasBody) {
      if (kind === 'json') throw hostError(HostErrorCode.BAD_REQUEST, 'this request needs a JSON body');
      return Promise.resolve(undefined);
    }
    if (announced !== undefined && announced > limit) {
      // Node drains the rest after the answer (keeping the connection); a huge one is cut instead.
      if (announced > DRAIN_LIMIT_FACTOR * limit) res.setHeader('Connection', 'close');
      throw tooLarge(limit);
    }
    const type = req.headers['content-type'] ?? '';
    if (!JSON_MEDIA_TYPE.test(type)) {
      throw hostError(
        HostErrorCode.UNSUPPORTED_MEDIA_TYPE,
        `the body must be application/json (UTF-8), not ${JSON.stringify(type)}`,
      );
    }
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let bytes = 0;
      const cleanup = () => {
        req.off('data', onData);
        req.off('end', onEnd);
        req.off('error', onError);
        req.off('aborted', onError);
      };
      const onData = (chunk: Buffer) => {
        bytes += chunk.length;
        if (bytes > limit) {
          cleanup();
          res.setHeader('Connection', 'close');
          reject(tooLarge(limit));
          return;
        }
        chunks.push(chunk);
      };
      const onEnd = () => {
        cleanup();
        try {
          resolve(parseBody(Buffer.concat(chunks, bytes), kind));
        } catch (err) {
          reject(err);
        }
      };
      const onError = () => {
        cleanup();
        reject(hostError(HostErrorCode.BAD_REQUEST, 'the request body was cut off'));
      };
      req.on('data', onData);
      req.on('end', onEnd);
      req.on('error', onError);
      req.on('aborted', onError);
    });
  }
}

function tooLarge(limit: number): VfioError {
  return hostError(HostErrorCode.BODY_TOO_LARGE, `the request body is larger than ${limit} bytes`);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function parseBody(bytes: Buffer, kind: BodyKind): unknown {
  let value: unknown;
  try {
    value = JSON.parse(utf8.decode(bytes));
  } catch (err) {
    throw hostError(HostErrorCode.BAD_JSON, `the body is not JSON: ${(err as Error).message}`);
  }
  if (kind === 'none' && !emptyBody.safeParse(value).success) {
    throw hostError(HostErrorCode.BAD_REQUEST, 'this request takes no body (or {})');
  }
  return value;
}

function parsePath(url: string): { segments: string[]; name: string | undefined } {
  if (!url.startsWith('/') || url.length > 1024)
    throw hostError(HostErrorCode.BAD_REQUEST, 'bad request target');
  if (url.includes('?') || url.includes('#')) {
    throw hostError(HostErrorCode.BAD_REQUEST, 'the control API takes no query string');
  }
  const segments = url
    .split('/')
    .filter((s) => s !== '')
    .map((s) => {
      try {
        return decodeURIComponent(s);
      } catch {
        throw hostError(HostErrorCode.BAD_REQUEST, `bad percent-encoding in ${JSON.stringify(s)}`);
      }
    });
  return { segments, name: segments[0] === 'vms' ? segments[1] : undefined };
}

function matches(pattern: readonly string[], segments: readonly string[]): boolean {
  return pattern.length === segments.length && pattern.every((p, i) => p === ':name' || p === segments[i]);
}

function checkName(name: string | undefined): asserts name is string {
  if (name === undefined || !SAFE_NAME.test(name)) {
    throw hostError(HostErrorCode.BAD_REQUEST, `VM name ${JSON.stringify(name ?? '')}: ${SAFE_NAME_TEXT}`);
  }
}

function send(res: ServerResponse, status: number, json: string): void {
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(json),
    'Cache-Control': 'no-store',
  });
  res.end(json);
}
