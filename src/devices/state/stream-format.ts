import { createHash } from 'node:crypto';

/**
 * Numbers of the device-state stream (layout drawn in state-loader.ts). Shared by the saver and the
 * loader so the two can never disagree.
 */
export const STREAM_MAGIC = 0x53445653; // 'SVDS' little-endian
export const FORMAT_VERSION = 1;
export const STREAM_HEADER_BYTES = 64;
export const RECORD_HEADER_BYTES = 24;
export const DEVICE_TYPE_BYTES = 16;

export const RecordKind = { DATA: 1, END: 2 } as const;

/** Dirty-tracking granularity of device regions. */
export const CHUNK_BYTES = 64 * 1024;
/** Largest record payload; records never cross a multiple of it (so never a 1 GiB segment). */
export const RECORD_MAX_BYTES = 1 << 20;

const MIX = 0x9e3779b97f4a7c15n;
const U64 = (v: bigint): bigint => BigInt.asUintN(64, v);

/** Fold one record into the END chain: the checksum AND where the payload went. */
export function chainRecord(
  chain: bigint,
  regionId: number,
  offset: bigint,
  length: number,
  sum: bigint,
): bigint {
  const where = U64(offset * 0xff51afd7ed558ccdn) ^ (BigInt(regionId) << 32n) ^ BigInt(length);
  const h = U64((chain ^ sum ^ where) * MIX);
  return h ^ (h >> 31n);
}

/** What a stream header carries: who produced it and in which configuration. */
export interface StreamIdentity {
  deviceType: string;
  deviceVersion: number;
  /** 64-bit hash of the configuration (region names and sizes, options). */
  fingerprint: bigint;
  /** Sum of the region sizes. */
  totalRegionBytes: bigint;
  regionCount: number;
}

/** The configuration fingerprint: the first 8 bytes of SHA-256 over a canonical description. */
export function configFingerprint(description: string): bigint {
  return createHash('sha256').update(description).digest().readBigUInt64LE(0);
}

export function encodeStreamHeader(id: StreamIdentity, target: Uint8Array): void {
  if (target.length !== STREAM_HEADER_BYTES) throw new RangeError('stream header buffer');
  target.fill(0);
  const v = new DataView(target.buffer, target.byteOffset, target.byteLength);
  v.setUint32(0, STREAM_MAGIC, true);
  v.setUint16(4, FORMAT_VERSION, true);
  v.setUint16(6, STREAM_HEADER_BYTES, true);
  const type = new TextEncoder().encode(id.deviceType);
  if (type.length > DEVICE_TYPE_BYTES) throw new RangeError(`device type ${id.deviceType} too long`);
  target.set(type, 8);
  v.setUint32(24, id.deviceVersion, true);
  v.setUint32(28, id.regionCount, true);
  v.setBigUint64(32, id.fingerprint, true);
  v.setBigUint64(40, id.totalRegionBytes, true);
}

export function decodeDeviceType(header: Uint8Array): string {
  const raw = header.subarray(8, 8 + DEVICE_TYPE_BYTES);
  const end = raw.indexOf(0);
  return new TextDecoder('utf-8', { fatal: false }).decode(end < 0 ? raw : raw.subarray(0, end));
}

export function encodeRecordHeader(
  target: DataView,
  kind: number,
  regionId: number,
  length: number,
  offset: bigint,
  sum: bigint,
): void {
  target.setUint16(0, kind, true);
  target.setUint16(2, regionId, true);
  target.setUint32(4, length, true);
  target.setBigUint64(8, offset, true);
  target.setBigUint64(16, sum, true);
}
