import { z } from 'zod';
import { RLIM_INFINITY } from '../../kernel/host/host.js';
import { VfioError } from '../../uapi/error.js';
import { GUEST_PAGE_BYTES } from '../machine/guest-page.js';
import { type MachineDefinition, resolveMachineDefinition } from '../machine/machine-definition.js';
import { MAX_RAM_BLOCK_BYTES } from '../machine/ram-block.js';
import { resolveWorkload } from '../machine/vcpu-workload.js';
import { parseByteValue } from './sizes.js';

/**
 * The VM definition as JSON (a file for `softvfio vm create`, the body of `POST /vms`): the
 * MachineDefinition with sizes as numbers or strings ("1GiB"), 64-bit values (GPAs, the memlock
 * limit) as numbers or strings, every field bounded, unknown fields refused. docs/VM-DEFINITION.md
 * documents it field by field.
 */

/** VM, host and device names: they end up in URLs, socket paths and error messages. */
export const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
export const SAFE_NAME_TEXT = '1-63 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit';

/** Bounds a host enforces on one definition (its own budget is checked when the VM is created). */
export const VM_DEFINITION_LIMITS = {
  ramBlocks: 16,
  vcpus: 32,
  devices: 32,
  emulatedDevices: 32,
  emulatedDevicePages: 1024,
  nicRingEntries: 65536,
  nicBufferBytes: 65536,
  nicFlowTableBytes: 256 * 2 ** 20,
  accelMemoryBytes: 2 ** 30,
  accelGuestBufferBytes: 64 * 2 ** 20,
  basicRegisterBytes: 2 ** 20,
  workUnitsPerTick: 10_000,
  dirtyRateMiBps: 1 << 20,
  guestDriverIntervalMs: 60_000,
  maxMemslots: 65536,
  /** uid_t, without (uid_t)-1. */
  uid: 2 ** 32 - 2,
} as const;

const U64_MAX = (1n << 64n) - 1n;
const PAGE = BigInt(GUEST_PAGE_BYTES);

const name = (what: string) => z.string().regex(SAFE_NAME, { error: `${what} must be ${SAFE_NAME_TEXT}` });

interface ByteRule {
  min: bigint;
  max: bigint;
  multipleOf?: bigint;
  powerOfTwo?: boolean;
}

function describeRule(rule: ByteRule): string {
  const parts = [`from ${rule.min} to ${rule.max}`];
  if (rule.multipleOf !== undefined && rule.multipleOf > 1n) parts.push(`a multiple of ${rule.multipleOf}`);
  if (rule.powerOfTwo) parts.push('a power of two');
  return parts.join(', ');
}

/** A byte value: a number or a size string, checked against `rule`, out as bigint. */
function byteValue(rule: ByteRule) {
  return z.union([z.number(), z.string()]).transform((value, ctx): bigint => {
    const n = parseByteValue(value);
    const ok =
      n !== undefined &&
      n >= rule.min &&
      n <= rule.max &&
      (rule.multipleOf === undefined || n % rule.multipleOf === 0n) &&
      (!rule.powerOfTwo || (n & (n - 1n)) === 0n);
    if (!ok) {
      const shape =
        n === undefined
          ? `is not a byte count (a non-negative integer, or a string like "512MiB", "4KiB", "0x1000")`
          : `must be ${describeRule(rule)}`;
      ctx.addIssue({ code: 'custom', message: `${JSON.stringify(value)} ${shape}`, input: value });
      return z.NEVER;
    }
    return n!;
  });
}

/** A byte value that fits a JS number (sizes handed to the machine as numbers). */
const byteSize = (rule: ByteRule) => byteValue(rule).transform((n) => Number(n));

const int = (min: number, max: number) => z.number().int().min(min).max(max);
const u32 = int(0, 0xffffffff);

const patternSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('random') }),
  z.strictObject({ kind: z.literal('sequential') }),
  z.strictObject({
    kind: z.literal('hot'),
    hotFraction: z.number().gt(0).max(1),
    hotProbability: z.number().min(0).max(1).optional(),
  }),
]);

const workloadSchema = z.strictObject({
  dirtyRateMiBps: z.number().min(0).max(VM_DEFINITION_LIMITS.dirtyRateMiBps).optional(),
  workingSetOffsetBytes: byteSize({ min: 0n, max: BigInt(MAX_RAM_BLOCK_BYTES), multipleOf: PAGE }).optional(),
  workingSetBytes: byteSize({ min: PAGE, max: BigInt(MAX_RAM_BLOCK_BYTES), multipleOf: PAGE }).optional(),
  pattern: patternSchema.optional(),
  seed: u32.optional(),
  writeBytesPerPage: int(4, GUEST_PAGE_BYTES)
    .refine((n) => (n & (n - 1)) === 0, { error: 'must be a power of two' })
    .optional(),
  pageWriteLimit: int(0, Number.MAX_SAFE_INTEGER).optional(),
});

const ramBlockSchema = z.strictObject({
  name: name('a RAM block name'),
  sizeBytes: byteSize({ min: PAGE, max: BigInt(MAX_RAM_BLOCK_BYTES), multipleOf: PAGE }),
  gpa: byteValue({ min: 0n, max: U64_MAX, multipleOf: PAGE }).optional(),
  discard: z
    .strictObject({
      blockSizeBytes: byteSize({ min: PAGE, max: 1n << 30n, powerOfTwo: true }),
      plugged: z.enum(['all', 'none']).optional(),
    })
    .optional(),
});

const deviceCommon = {
  name: name('a device name'),
  seed: u32.optional(),
  migrationFlags: u32.optional(),
  workUnitsPerTick: int(0, VM_DEFINITION_LIMITS.workUnitsPerTick).optional(),
  iommuDirtyTracking: z.boolean().optional(),
};

const deviceSchema = z.discriminatedUnion('type', [
  z.strictObject({
    type: z.literal('nic'),
    ...deviceCommon,
    flowTableBytes: byteSize({
      min: 64n,
      max: BigInt(VM_DEFINITION_LIMITS.nicFlowTableBytes),
      multipleOf: 64n,
    }).optional(),
    rxRing: z
      .strictObject({
        entries: int(1, VM_DEFINITION_LIMITS.nicRingEntries),
        bufferBytes: byteSize({
          min: 128n,
          max: BigInt(VM_DEFINITION_LIMITS.nicBufferBytes),
          multipleOf: 4n,
        }),
      })
      .optional(),
  }),
  z.strictObject({
    type: z.literal('accel'),
    ...deviceCommon,
    memoryBytes: byteSize({
      min: PAGE,
      max: BigInt(VM_DEFINITION_LIMITS.accelMemoryBytes),
      multipleOf: PAGE,
    }).optional(),
    guestBufferBytes: byteSize({
      min: 1n,
      max: BigInt(VM_DEFINITION_LIMITS.accelGuestBufferBytes),
    }).optional(),
  }),
  z.strictObject({
    type: z.literal('basic'),
    ...deviceCommon,
    registerBytes: byteSize({
      min: PAGE,
      max: BigInt(VM_DEFINITION_LIMITS.basicRegisterBytes),
      multipleOf: PAGE,
    }).optional(),
  }),
]);

const emulatedDeviceSchema = z.strictObject({
  name: name('an emulated device name'),
  pages: int(1, VM_DEFINITION_LIMITS.emulatedDevicePages).optional(),
  seed: u32.optional(),
});

const memlockSchema = z.union([
  z.literal('unlimited').transform(() => RLIM_INFINITY),
  byteValue({ min: 0n, max: U64_MAX }),
]);

/** The JSON schema of a VM definition; its output is a MachineDefinition. */
export const vmDefinitionSchema = z
  .strictObject({
    name: name('the VM name'),
    ram: z.array(ramBlockSchema).min(1).max(VM_DEFINITION_LIMITS.ramBlocks),
    vcpus: z.strictObject({
      count: int(1, VM_DEFINITION_LIMITS.vcpus),
      workload: z.union([workloadSchema, z.array(workloadSchema).max(VM_DEFINITION_LIMITS.vcpus)]).optional(),
    }),
    devices: z.array(deviceSchema).max(VM_DEFINITION_LIMITS.devices).optional(),
    emulatedDevices: z.array(emulatedDeviceSchema).max(VM_DEFINITION_LIMITS.emulatedDevices).optional(),
    iommu: z.enum(['iommufd', 'type1']),
    memlockLimitBytes: memlockSchema.optional(),
    accounting: z.enum(['user', 'mm', 'none']).optional(),
    uid: int(0, VM_DEFINITION_LIMITS.uid).optional(),
    guestDriverIntervalMs: z.number().min(1).max(VM_DEFINITION_LIMITS.guestDriverIntervalMs).optional(),
    maxMemslots: int(1, VM_DEFINITION_LIMITS.maxMemslots).optional(),
  })
  .superRefine((def, ctx) => {
    const seen = new Map<string, string>();
    const unique = (n: string, path: (string | number)[], kind: string) => {
      const before = seen.get(n);
      if (before === undefined) seen.set(n, formatJsonPath(path));
      else ctx.addIssue({ code: 'custom', message: `${kind} name ${n} is taken (${before})`, path });
    };
    def.ram.forEach((b, i) => unique(b.name, ['ram', i, 'name'], 'RAM block'));
    seen.clear();
    def.devices?.forEach((d, i) => unique(d.name, ['devices', i, 'name'], 'device'));
    def.emulatedDevices?.forEach((d, i) => unique(d.name, ['emulatedDevices', i, 'name'], 'emulated device'));
    if (def.ram[0]!.discard !== undefined) {
      ctx.addIssue({
        code: 'custom',
        message: 'the first RAM block is boot memory and cannot be discardable',
        path: ['ram', 0, 'discard'],
      });
    }
    def.ram.forEach((b, i) => {
      if (b.discard !== undefined && b.sizeBytes % b.discard.blockSizeBytes !== 0) {
        ctx.addIssue({
          code: 'custom',
          message: `block size ${b.discard.blockSizeBytes} does not divide the block's size ${b.sizeBytes}`,
          path: ['ram', i, 'discard', 'blockSizeBytes'],
        });
      }
      if (b.discard !== undefined && b.gpa !== undefined && b.gpa % BigInt(b.discard.blockSizeBytes) !== 0n) {
        ctx.addIssue({
          code: 'custom',
          message: `gpa ${b.gpa} is not aligned to the block size ${b.discard.blockSizeBytes}`,
          path: ['ram', i, 'gpa'],
        });
      }
    });
    const w = def.vcpus.workload;
    if (Array.isArray(w) && w.length !== def.vcpus.count) {
      ctx.addIssue({
        code: 'custom',
        message: `${w.length} workloads for ${def.vcpus.count} vCPUs: give one for all or one each`,
        path: ['vcpus', 'workload'],
      });
    }
    if (def.iommu === 'type1' && def.accounting === 'user') {
      ctx.addIssue({
        code: 'custom',
        message: "type1 charges the VMM's mm ('mm' or 'none'); per-user accounting ('user') needs iommufd",
        path: ['accounting'],
      });
    }
  });

/** One schema violation: where in the JSON (`$.ram[0].sizeBytes`) and what is wrong. */
export interface DefinitionIssue {
  path: string;
  message: string;
}

/** A VM definition that is not valid JSON of the schema, or that the machine refuses. */
export class VmDefinitionError extends VfioError {
  readonly issues: DefinitionIssue[];
  constructor(issues: DefinitionIssue[], source?: string) {
    const head = `${source ? `${source}: ` : ''}invalid VM definition`;
    const shown = issues.slice(0, 20).map((i) => `${i.path}: ${i.message}`);
    const more = issues.length > 20 ? [`… and ${issues.length - 20} more`] : [];
    super('ERR_VM_DEFINITION', [`${head} (${issues.length} issue(s))`, ...shown, ...more].join('\n  '));
    this.issues = issues;
  }
}

/** `$`, `$.ram[0].sizeBytes`, `$["odd key"]`. */
export function formatJsonPath(path: readonly PropertyKey[]): string {
  let out = '$';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else if (typeof key === 'string' && /^[A-Za-z_$][\w$]*$/.test(key)) out += `.${key}`;
    else out += `[${JSON.stringify(String(key))}]`;
  }
  return out;
}

const MAX_ISSUES = 100;

/**
 * Validate a VM definition read from JSON and turn it into a MachineDefinition; throws
 * VmDefinitionError listing every violation with its JSON path. Besides the schema, the machine's
 * own checks run here (device buffers fitting the boot block, workloads inside guest RAM), so a
 * definition accepted here is one `Machine.create` accepts.
 */
export function parseVmDefinition(input: unknown, source?: string): MachineDefinition {
  const parsed = vmDefinitionSchema.safeParse(input);
  if (!parsed.success) {
    throw new VmDefinitionError(
      parsed.error.issues
        .slice(0, MAX_ISSUES)
        .map((i) => ({ path: formatJsonPath(i.path), message: i.message })),
      source,
    );
  }
  const def: MachineDefinition = parsed.data;
  const issues: DefinitionIssue[] = [];
  try {
    const resolved = resolveMachineDefinition(def);
    const ramBytes = resolved.ram.reduce((n, b) => n + b.sizeBytes, 0);
    resolved.vcpuWorkload.forEach((w, i) => {
      try {
        resolveWorkload(w, ramBytes);
      } catch (err) {
        const path = Array.isArray(def.vcpus.workload) ? `$.vcpus.workload[${i}]` : '$.vcpus.workload';
        if (!issues.some((x) => x.path === path)) issues.push({ path, message: (err as Error).message });
      }
    });
  } catch (err) {
    if (!(err instanceof VfioError)) throw err;
    issues.push({ path: '$', message: err.message });
  }
  if (issues.length > 0) throw new VmDefinitionError(issues, source);
  return def;
}

/**
 * What a VM costs its host in bytes of memory it may touch: guest RAM, plus each device's state
 * (flow table, device memory, registers). The host's budget is checked against this.
 */
export function vmFootprintBytes(def: MachineDefinition): number {
  let bytes = def.ram.reduce((n, b) => n + b.sizeBytes, 0);
  for (const d of def.devices ?? []) {
    if (d.type === 'nic') bytes += (d.flowTableBytes ?? 8 * 2 ** 20) + 64 * 1024 + 4096;
    else if (d.type === 'accel') bytes += (d.memoryBytes ?? 64 * 2 ** 20) + 4096;
    else bytes += d.registerBytes ?? 4096;
  }
  return bytes;
}
