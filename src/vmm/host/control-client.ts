import { type IncomingMessage, request } from 'node:http';
import { z } from 'zod';
import { isErrnoName } from '../../uapi/errno.js';
import { VfioError } from '../../uapi/error.js';
import {
  type ErrorBody,
  type HostInfoWire,
  MAX_REQUEST_BODY_BYTES,
  MAX_RESPONSE_BODY_BYTES,
  type VmDigestWire,
  type VmInfoWire,
  type VmSummaryWire,
} from './control-protocol.js';
import type { MigrationEvent, MigrationInfo } from '../migration/migration-info.js';
import { HostErrorCode, hostError } from './host-errors.js';
import type { IncomingAnswer, IncomingRequest, MigrateRequest } from './software-host.js';
import { defaultSocketPath, formatAddress, type ListenAddress, unixAddress } from './listen-address.js';

/** An error the host answered with (or the client's own: no host, a bad answer, a timeout). */
export class ControlError extends VfioError {
  /** The HTTP status; 0 when the host did not answer. */
  readonly httpStatus: number;
  /** The numbers of a typed error (see errorDetails in control-protocol.ts). */
  readonly details: Record<string, unknown> | undefined;

  constructor(httpStatus: number, body: ErrorBody['error']) {
    // The message already names the target and operation; the errno is kept when it is one.
    const errno = body.errno !== undefined && isErrnoName(body.errno) ? body.errno : undefined;
    super(body.code, body.message, errno === undefined ? {} : { errno });
    this.httpStatus = httpStatus;
    this.details = body.details;
  }
}

const text = (max: number) => z.string().max(max);
const count = z.number().nonnegative();
const machineState = z.enum([
  'created',
  'starting',
  'running',
  'stopped',
  'incoming',
  'migrated',
  'failed',
  'destroyed',
]);
const migrationStatus = z.enum([
  'none',
  'setup',
  'active',
  'device',
  'completed',
  'failed',
  'cancelling',
  'cancelled',
]);
const migrationInfoSchema = z.looseObject({
  role: z.enum(['source', 'destination']),
  vm: text(64),
  status: migrationStatus,
  totalTimeMs: count,
  setupTimeMs: count,
  downtimeMs: count.optional(),
  expectedDowntimeMs: count.optional(),
  cpuThrottlePercentage: count,
  bandwidthBytesPerMs: count,
  thresholdBytes: count,
  switchoverAcked: z.boolean(),
  queuedBuffers: z.looseObject({ bytes: count, peakBytes: count, capBytes: count }).optional(),
  ram: z.looseObject({
    transferredBytes: count,
    remainingBytes: count,
    totalBytes: count,
    duplicatePages: count,
    normalPages: count,
    normalBytes: count,
    dirtyPagesRate: count,
    mbps: count,
    dirtySyncCount: count,
    pageSizeBytes: count,
    multifdBytes: count,
    pagesPerSecond: count,
    precopyBytes: count,
    downtimeBytes: count,
  }),
  vfio: z.looseObject({ transferredBytes: count }),
  devices: z
    .array(
      z.looseObject({
        name: text(64),
        type: text(64),
        state: text(32),
        precopyBytes: count,
        stopCopyBytes: count,
        packets: count,
        initialBytes: count,
        dirtyBytes: count,
      }),
    )
    .max(256),
  channels: z
    .array(z.looseObject({ index: count, kind: z.enum(['main', 'multifd']), bytes: count }))
    .max(256),
  error: z
    .looseObject({
      code: text(200),
      message: text(64 * 1024),
      phase: z.enum([
        'connect',
        'handshake',
        'setup',
        'precopy',
        'switchover',
        'stop-copy',
        'load',
        'hand-off',
        'cleanup',
      ]),
      device: text(255).optional(),
      errno: text(32).optional(),
    })
    .optional(),
});
const migrationEventSchema = z.looseObject({
  type: z.enum(['status', 'progress', 'pass', 'device-state', 'throttle', 'end']),
});
/** Longest line of a migration event stream. */
const MAX_EVENT_LINE_BYTES = 1 << 20;
const errorShape = z.strictObject({
  code: text(200),
  message: text(64 * 1024),
  errno: text(32).optional(),
  target: text(1024).optional(),
  op: text(1024).optional(),
  details: z.record(z.string(), z.unknown()).optional(),
});
const errorBodySchema = z.strictObject({ error: errorShape });
const vmErrorShape = z.looseObject({ code: text(200), message: text(64 * 1024) }).optional();

const hostInfoSchema = z.looseObject({
  name: text(64),
  pid: count,
  startedAt: text(64),
  uptimeMs: count,
  vms: count,
  shuttingDown: z.boolean(),
  limits: z.looseObject({ maxVms: count, maxMemoryBytes: count }),
  memory: z.looseObject({ usedBytes: count }),
  kernel: z.looseObject({ dmaEntryLimit: count }),
});

const vmSummarySchema = z.looseObject({
  name: text(64),
  state: machineState,
  iommu: z.enum(['iommufd', 'type1']),
  accounting: z.enum(['user', 'mm', 'none']),
  ramBytes: count,
  vcpus: count,
  devices: z.array(text(200)),
  error: vmErrorShape,
});

const vmInfoSchema = z.looseObject({
  name: text(64),
  state: machineState,
  error: vmErrorShape,
  iommu: z.enum(['iommufd', 'type1']),
  accounting: z.enum(['user', 'mm', 'none']),
  ram: z.looseObject({
    totalBytes: count,
    mappedBytes: count,
    mappings: count,
    blocks: z.array(z.looseObject({ name: text(64), gpa: text(32), sizeBytes: count, pluggedBytes: count })),
  }),
  vcpus: z.looseObject({ count, state: text(32), bytesWritten: count, pageWrites: count }),
  devices: z.array(
    z.looseObject({
      name: text(64),
      type: text(32),
      migrationState: text(64),
      bytesRead: count,
      bytesWritten: count,
      faults: count,
    }),
  ),
  emulatedDevices: z.array(z.looseObject({ name: text(64) })),
  dmaFaults: count,
  bytesDirtied: z.looseObject({ vcpus: count, deviceDma: count, emulatedDevices: count, total: count }),
  lockedPages: count,
  pid: count,
  uid: count,
  memlockLimitBytes: text(32),
  footprintBytes: count,
  createdAt: text(64),
});

const vmDigestSchema = z.looseObject({
  name: text(64),
  state: machineState,
  digest: z.string().regex(/^[0-9a-f]{64}$/),
  bytesDirtied: count,
});

export interface ControlClientOptions {
  /** Time for one request and its answer (a 1 GiB VM starts in well under a second); default 120 s. */
  timeoutMs?: number;
}

export interface CallOptions {
  signal?: AbortSignal;
}

/**
 * A typed client of a software host's control API (control-protocol.ts). Each call is one
 * request on its own connection; answers are size-checked and validated, errors come back as
 * ControlError with the host's code, errno and numbers. ERR_NO_HOST when nobody listens.
 */
export class ControlClient {
  readonly address: ListenAddress;
  readonly #timeoutMs: number;

  constructor(address: ListenAddress, options: ControlClientOptions = {}) {
    this.address = address;
    this.#timeoutMs = options.timeoutMs ?? 120_000;
  }

  /** The client of host `name` on its default socket. */
  static forHost(name: string, options?: ControlClientOptions): ControlClient {
    return new ControlClient(unixAddress(defaultSocketPath(name)), options);
  }

  hostInfo(options?: CallOptions): Promise<HostInfoWire> {
    return this.#call('GET', '/host', undefined, hostInfoSchema, options) as Promise<HostInfoWire>;
  }

  /** Ask the host to stop its VMs and exit (202: it has started to). */
  async shutdown(options?: CallOptions): Promise<void> {
    await this.#call(
      'POST',
      '/shutdown',
      undefined,
      z.looseObject({ shuttingDown: z.literal(true) }),
      options,
    );
  }

  async listVms(options?: CallOptions): Promise<VmSummaryWire[]> {
    const body = await this.#call(
      'GET',
      '/vms',
      undefined,
      z.strictObject({ vms: z.array(vmSummarySchema) }),
      options,
    );
    return body.vms as VmSummaryWire[];
  }

  /** Create a VM from a definition as read from JSON (the host validates it). */
  createVm(definition: unknown, options?: CallOptions): Promise<VmInfoWire> {
    return this.#call('POST', '/vms', definition, vmInfoSchema, options) as Promise<VmInfoWire>;
  }

  vmStatus(name: string, options?: CallOptions): Promise<VmInfoWire> {
    return this.#call('GET', vmPath(name), undefined, vmInfoSchema, options) as Promise<VmInfoWire>;
  }

  startVm(name: string, options?: CallOptions): Promise<VmInfoWire> {
    return this.#call(
      'POST',
      `${vmPath(name)}/start`,
      undefined,
      vmInfoSchema,
      options,
    ) as Promise<VmInfoWire>;
  }

  stopVm(name: string, options?: CallOptions): Promise<VmInfoWire> {
    return this.#call(
      'POST',
      `${vmPath(name)}/stop`,
      undefined,
      vmInfoSchema,
      options,
    ) as Promise<VmInfoWire>;
  }

  vmDigest(name: string, options?: CallOptions): Promise<VmDigestWire> {
    return this.#call(
      'GET',
      `${vmPath(name)}/digest`,
      undefined,
      vmDigestSchema,
      options,
    ) as Promise<VmDigestWire>;
  }

  /** Make a created VM wait for an incoming migration; answers with the URI to migrate to. */
  async incoming(name: string, body: IncomingRequest, options?: CallOptions): Promise<IncomingAnswer> {
    const answer = await this.#call(
      'POST',
      `${vmPath(name)}/incoming`,
      body,
      z.looseObject({
        uri: text(300),
        address: z.strictObject({ host: text(253), port: count }),
        info: migrationInfoSchema,
      }),
      options,
    );
    return answer as unknown as IncomingAnswer;
  }

  /** Start migrating a running VM; answers at once (status 'setup'). */
  async migrate(name: string, body: MigrateRequest, options?: CallOptions): Promise<MigrationInfo> {
    return (await this.#call(
      'POST',
      `${vmPath(name)}/migrate`,
      body,
      migrationInfoSchema,
      options,
    )) as MigrationInfo;
  }

  /** query-migrate. */
  async queryMigration(name: string, options?: CallOptions): Promise<MigrationInfo> {
    return (await this.#call(
      'GET',
      `${vmPath(name)}/migration`,
      undefined,
      migrationInfoSchema,
      options,
    )) as MigrationInfo;
  }

  /** migrate_cancel. */
  async cancelMigration(name: string, options?: CallOptions): Promise<MigrationInfo> {
    return (await this.#call(
      'POST',
      `${vmPath(name)}/migration/cancel`,
      undefined,
      migrationInfoSchema,
      options,
    )) as MigrationInfo;
  }

  /**
   * The VM's migration events as they happen, ending after the 'end' event. A line longer than
   * 1 MiB or not an event is ERR_BAD_RESPONSE; no timeout applies (a migration takes its time).
   */
  async *migrationEvents(name: string, options: CallOptions = {}): AsyncGenerator<MigrationEvent> {
    const path = `${vmPath(name)}/migration/events`;
    const target =
      this.address.kind === 'unix'
        ? { socketPath: this.address.path }
        : { host: this.address.host, port: this.address.port };
    const res = await new Promise<IncomingMessage>((resolve, reject) => {
      const req = request({ ...target, method: 'GET', path, agent: false, signal: options.signal }, resolve);
      req.on('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
          reject(hostError(HostErrorCode.NO_HOST, `no host is listening on ${formatAddress(this.address)}`));
        } else reject(err);
      });
      req.end();
    });
    if ((res.statusCode ?? 0) >= 400) {
      const chunks: Buffer[] = [];
      let bytes = 0;
      for await (const chunk of res as AsyncIterable<Buffer>) {
        bytes += chunk.length;
        if (bytes > MAX_RESPONSE_BODY_BYTES) throw this.#badResponse('an oversized error');
        chunks.push(chunk);
      }
      const parsed = errorBodySchema.safeParse(safeJson(Buffer.concat(chunks).toString('utf8')));
      if (!parsed.success) throw this.#badResponse(`a ${res.statusCode} answer without a typed error`);
      throw new ControlError(res.statusCode!, parsed.data.error as ErrorBody['error']);
    }
    let pending = '';
    for await (const chunk of res as AsyncIterable<Buffer>) {
      pending += chunk.toString('utf8');
      if (pending.length > MAX_EVENT_LINE_BYTES && !pending.includes('\n')) {
        res.destroy();
        throw this.#badResponse('an event line longer than 1 MiB');
      }
      let newline: number;
      while ((newline = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, newline);
        pending = pending.slice(newline + 1);
        if (line.length === 0) continue;
        const parsed = migrationEventSchema.safeParse(safeJson(line));
        if (!parsed.success) {
          res.destroy();
          throw this.#badResponse('a line that is not a migration event');
        }
        const event = parsed.data as unknown as MigrationEvent;
        yield event;
        if (event.type === 'end') {
          res.destroy();
          return;
        }
      }
    }
    throw this.#badResponse('an event stream that ended before the migration did');
  }

  async destroyVm(name: string, options?: CallOptions): Promise<void> {
    await this.#call(
      'DELETE',
      vmPath(name),
      undefined,
      z.looseObject({ destroyed: z.literal(true) }),
      options,
    );
  }

  async #call<S extends z.ZodType>(
    method: string,
    path: string,
    body: unknown,
    schema: S,
    options: CallOptions = {},
  ): Promise<z.output<S>> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    if (payload !== undefined && payload.length > MAX_REQUEST_BODY_BYTES) {
      throw hostError(
        HostErrorCode.BODY_TOO_LARGE,
        `the request body is ${payload.length} bytes, more than the host takes (${MAX_REQUEST_BODY_BYTES})`,
      );
    }
    const { status, json } = await this.#request(method, path, payload, options.signal);
    if (status >= 400) {
      const parsed = errorBodySchema.safeParse(json);
      if (!parsed.success) throw this.#badResponse(`a ${status} answer without a typed error`);
      throw new ControlError(status, parsed.data.error as ErrorBody['error']);
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) {
      const first = parsed.error.issues[0];
      throw this.#badResponse(
        `answer to ${method} ${path}: ${first?.path.join('.') ?? ''} ${first?.message ?? ''}`,
      );
    }
    return parsed.data;
  }

  #badResponse(message: string): VfioError {
    return hostError(
      HostErrorCode.BAD_RESPONSE,
      `the host at ${formatAddress(this.address)} sent ${message}`,
    );
  }

  #request(
    method: string,
    path: string,
    payload: Buffer | undefined,
    signal: AbortSignal | undefined,
  ): Promise<{ status: number; json: unknown }> {
    const where = formatAddress(this.address);
    const target =
      this.address.kind === 'unix'
        ? { socketPath: this.address.path }
        : { host: this.address.host, port: this.address.port };
    return new Promise((resolve, reject) => {
      let settled = false;
      let answered = false;
      const settle = (outcome: { status: number; json: unknown } | Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (outcome instanceof Error) {
          req.destroy();
          reject(outcome);
        } else resolve(outcome);
      };
      const headers: Record<string, string | number> = { Accept: 'application/json' };
      if (payload !== undefined) {
        headers['Content-Type'] = 'application/json';
        headers['Content-Length'] = payload.length;
      }
      const req = request({ ...target, method, path, headers, agent: false, signal }, (res) => {
        answered = true;
        const status = res.statusCode ?? 0;
        const announced = Number(res.headers['content-length'] ?? 0);
        if (announced > MAX_RESPONSE_BODY_BYTES) {
          settle(this.#badResponse(`a ${announced}-byte answer`));
          return;
        }
        const chunks: Buffer[] = [];
        let bytes = 0;
        res.on('data', (chunk: Buffer) => {
          bytes += chunk.length;
          if (bytes > MAX_RESPONSE_BODY_BYTES)
            settle(this.#badResponse(`more than ${MAX_RESPONSE_BODY_BYTES} bytes`));
          else chunks.push(chunk);
        });
        res.on('error', (err) => settle(this.#badResponse(`a broken answer (${err.message})`)));
        res.on('end', () => {
          let json: unknown;
          try {
            json = JSON.parse(Buffer.concat(chunks, bytes).toString('utf8'));
          } catch {
            settle(this.#badResponse(`a ${status} answer that is not JSON`));
            return;
          }
          settle({ status, json });
        });
      });
      const timer = setTimeout(
        () =>
          settle(
            hostError(
              HostErrorCode.TIMEOUT,
              `${method} ${path}: no answer from ${where} in ${this.#timeoutMs} ms`,
            ),
          ),
        this.#timeoutMs,
      );
      req.on('error', (err: NodeJS.ErrnoException) => {
        if (err.name === 'AbortError') settle(signal?.reason instanceof Error ? signal.reason : err);
        else if (answered) settle(this.#badResponse(`a broken answer (${err.message})`));
        else if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
          settle(hostError(HostErrorCode.NO_HOST, `no host is listening on ${where}`));
        } else settle(hostError(HostErrorCode.NO_HOST, `cannot reach the host on ${where}: ${err.message}`));
      });
      req.end(payload);
    });
  }
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function vmPath(name: string): string {
  return `/vms/${encodeURIComponent(name)}`;
}
