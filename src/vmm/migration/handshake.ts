import { z } from 'zod';
import type { Machine } from '../machine/machine.js';
import { isErrnoName } from '../../uapi/errno.js';
import { MigrationError, MigrationErrorCode, type MigrationErrorCodeName } from './migration-error.js';
import type { MigrationPhase } from './migration-info.js';
import { RAM_PAGE_BYTES } from './wire-format.js';

/**
 * The handshake: the first frame of every channel is a HELLO (JSON). The main channel's HELLO
 * carries the protocol version, a session id, the number of multifd channels and the VM's
 * configuration; each multifd channel's HELLO names the session and its index. The destination
 * answers the main HELLO with ACCEPT, or with ERROR (ERR_MIGRATION_INCOMPATIBLE and every
 * difference found) before any data moves.
 */

export const PROTOCOL_MAGIC = 'softvfio-migration';
export const PROTOCOL_VERSION = 1;
/** Most multifd channels a destination accepts (QEMU's multifd-channels maximum). */
export const MAX_CHANNELS = 255;

/** What must match for a VM to migrate: RAM layout, devices (type, version, features, configuration). */
export interface VmMigrationConfig {
  pageSizeBytes: number;
  vcpus: number;
  ram: { name: string; gpa: string; sizeBytes: number; discardBlockBytes: number | null }[];
  devices: {
    name: string;
    type: string;
    /** Version of the device's state stream format. */
    version: number;
    /** Fingerprint of the device's configuration (region sizes, options), hex. */
    fingerprint: string;
    /** VFIO_DEVICE_FEATURE_MIGRATION flags. */
    migrationFlags: number;
  }[];
}

const name = z.string().min(1).max(255);
const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

const configSchema = z.strictObject({
  pageSizeBytes: count,
  vcpus: count,
  ram: z
    .array(
      z.strictObject({
        name,
        gpa: z.string().regex(/^\d{1,20}$/),
        sizeBytes: count,
        discardBlockBytes: count.nullable(),
      }),
    )
    .max(256),
  devices: z
    .array(
      z.strictObject({
        name,
        type: z.string().min(1).max(64),
        version: count,
        fingerprint: z.string().regex(/^[0-9a-f]{1,16}$/),
        migrationFlags: count,
      }),
    )
    .max(256),
});

const session = z.string().regex(/^[0-9a-f-]{8,64}$/);

export const mainHelloSchema = z.strictObject({
  magic: z.literal(PROTOCOL_MAGIC),
  version: z.number().int(),
  session,
  kind: z.literal('main'),
  vm: name,
  channels: z.number().int().min(0).max(MAX_CHANNELS),
  switchoverAck: z.boolean(),
  config: configSchema,
});
export type MainHello = z.infer<typeof mainHelloSchema>;

export const channelHelloSchema = z.strictObject({
  magic: z.literal(PROTOCOL_MAGIC),
  version: z.number().int(),
  session,
  kind: z.literal('multifd'),
  channel: z.number().int().min(1).max(MAX_CHANNELS),
});
export type ChannelHello = z.infer<typeof channelHelloSchema>;

export const helloSchema = z.discriminatedUnion('kind', [mainHelloSchema, channelHelloSchema]);

export const acceptSchema = z.strictObject({
  magic: z.literal(PROTOCOL_MAGIC),
  version: z.number().int(),
  session,
  vm: name,
  /** Devices whose initial precopy data the destination waits for before acking the switchover. */
  switchoverAckPending: z.number().int().nonnegative(),
});
export type Accept = z.infer<typeof acceptSchema>;

/** The ERROR frame: a refusal or a failure, from either side. */
export const errorFrameSchema = z.strictObject({
  code: z.string().min(1).max(64),
  phase: z.string().min(1).max(32),
  message: z.string().max(8192),
  device: z.string().max(255).optional(),
  errno: z.string().max(32).optional(),
});
export type ErrorFrame = z.infer<typeof errorFrameSchema>;

/** The ERROR frame telling the peer about a failure of ours. */
export function errorFrame(error: MigrationError): ErrorFrame {
  return {
    code: error.code,
    phase: error.phase,
    message: error.message.slice(0, 8192),
    ...(error.device === undefined ? {} : { device: error.device }),
    ...(error.errno === undefined ? {} : { errno: error.errno }),
  };
}

/**
 * A peer's ERROR frame as a failure of ours in `phase`: ERR_MIGRATION_PEER carrying the peer's
 * phase, device and errno, or the peer's own code when it is one of `kept` (a refusal or a cancel
 * means the same on both sides).
 */
export function peerError(
  json: unknown,
  phase: MigrationPhase,
  peer: 'source' | 'destination',
  kept: readonly MigrationErrorCodeName[],
): MigrationError {
  const parsed = errorFrameSchema.safeParse(json);
  if (!parsed.success) {
    return new MigrationError(MigrationErrorCode.PEER, phase, `the ${peer} sent a malformed ERROR frame`);
  }
  const e = parsed.data;
  const code = (kept as readonly string[]).includes(e.code)
    ? (e.code as MigrationErrorCodeName)
    : MigrationErrorCode.PEER;
  return new MigrationError(code, phase, `the ${peer} failed in ${e.phase}: ${e.message}`, {
    ...(e.device === undefined ? {} : { device: e.device }),
    ...(e.errno !== undefined && isErrnoName(e.errno) ? { errno: e.errno } : {}),
  });
}

/** The VM's configuration as the handshake carries it. */
export function describeVm(machine: Machine): VmMigrationConfig {
  return {
    pageSizeBytes: RAM_PAGE_BYTES,
    vcpus: machine.definition.vcpuCount,
    ram: machine.ram.blocks.map((b) => ({
      name: b.name,
      gpa: b.gpa.toString(),
      sizeBytes: b.sizeBytes,
      discardBlockBytes: b.discard?.blockSizeBytes ?? null,
    })),
    devices: machine.devices.map((d) => {
      const id = d.device.driver.image.identity;
      return {
        name: d.name,
        type: d.type,
        version: id.deviceVersion,
        fingerprint: id.fingerprint.toString(16),
        migrationFlags: Number(d.device.vfio.getMigration().flags),
      };
    }),
  };
}

/** Every difference between the source's configuration and the destination's, in words. */
export function configDifferences(source: VmMigrationConfig, destination: VmMigrationConfig): string[] {
  const out: string[] = [];
  if (source.pageSizeBytes !== destination.pageSizeBytes) {
    out.push(`page size ${source.pageSizeBytes} vs ${destination.pageSizeBytes}`);
  }
  if (source.vcpus !== destination.vcpus) out.push(`${source.vcpus} vCPUs vs ${destination.vcpus}`);
  const ram = (r: VmMigrationConfig['ram'][number]) =>
    `${r.name} at ${r.gpa}, ${r.sizeBytes} bytes${r.discardBlockBytes === null ? '' : `, discard blocks of ${r.discardBlockBytes}`}`;
  const ramLength = Math.max(source.ram.length, destination.ram.length);
  for (let i = 0; i < ramLength; i++) {
    const s = source.ram[i];
    const d = destination.ram[i];
    if (s === undefined || d === undefined || ram(s) !== ram(d)) {
      out.push(`RAM block ${i}: ${s ? ram(s) : 'none'} vs ${d ? ram(d) : 'none'}`);
    }
  }
  const devLength = Math.max(source.devices.length, destination.devices.length);
  for (let i = 0; i < devLength; i++) {
    const s = source.devices[i];
    const d = destination.devices[i];
    if (s === undefined || d === undefined) {
      out.push(`device ${i}: ${s?.name ?? 'none'} vs ${d?.name ?? 'none'}`);
      continue;
    }
    const what = `device ${s.name}`;
    if (s.name !== d.name) out.push(`device ${i}: ${s.name} vs ${d.name}`);
    else if (s.type !== d.type) out.push(`${what}: type ${s.type} vs ${d.type}`);
    else {
      if (s.version !== d.version) out.push(`${what}: state version ${s.version} vs ${d.version}`);
      if (s.fingerprint !== d.fingerprint)
        out.push(`${what}: configuration ${s.fingerprint} vs ${d.fingerprint}`);
      if (s.migrationFlags !== d.migrationFlags) {
        out.push(
          `${what}: migration features 0x${s.migrationFlags.toString(16)} vs 0x${d.migrationFlags.toString(16)}`,
        );
      }
    }
  }
  return out;
}

/**
 * Check a decoded HELLO's JSON; ERR_MIGRATION_PROTOCOL naming the first issue, or
 * ERR_MIGRATION_INCOMPATIBLE for another protocol version (checked first: a HELLO of another
 * version may carry other fields, and the peer must hear that the version is the reason).
 */
export function parseHello(json: unknown): MainHello | ChannelHello {
  const head = typeof json === 'object' && json !== null ? (json as Record<string, unknown>) : {};
  if (head.magic === PROTOCOL_MAGIC && Number.isInteger(head.version) && head.version !== PROTOCOL_VERSION) {
    throw new MigrationError(
      MigrationErrorCode.INCOMPATIBLE,
      'handshake',
      `protocol version ${String(head.version)} is not supported (this side speaks ${PROTOCOL_VERSION})`,
    );
  }
  const result = helloSchema.safeParse(json);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    throw new MigrationError(
      MigrationErrorCode.PROTOCOL,
      'handshake',
      `bad HELLO: ${issue.path.join('.') || '(root)'}: ${issue.message}`,
    );
  }
  return result.data;
}
