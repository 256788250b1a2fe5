import Table from 'cli-table3';
import { RLIM_INFINITY } from '../kernel/host/host.js';
import type { VmDigestWire, VmInfoWire, VmSummaryWire } from '../vmm/host/control-protocol.js';
import { formatBytes } from '../vmm/host/sizes.js';

const PLAIN = { head: [] as string[], border: [] as string[] };

function hex(value: string | number | bigint): string {
  try {
    return `0x${BigInt(value).toString(16)}`;
  } catch {
    return String(value);
  }
}
const int = (n: number) => n.toLocaleString('en-US');

/** One VM: what it is and does, then its RAM blocks, devices and emulated devices. */
export function renderVmInfo(vm: VmInfoWire): string {
  const memlock =
    vm.memlockLimitBytes === RLIM_INFINITY.toString() ? 'unlimited' : formatBytes(vm.memlockLimitBytes);
  const summary = new Table({ style: { ...PLAIN, compact: true } });
  const rows: [string, string][] = [
    ['state', vm.state + (vm.error ? ` (${vm.error.code})` : '')],
    ['iommu / accounting', `${vm.iommu} / ${vm.accounting}`],
    ['VMM process', `pid ${vm.pid}, uid ${vm.uid}, RLIMIT_MEMLOCK ${memlock}`],
    [
      'RAM',
      `${formatBytes(vm.ram.totalBytes)}, ${formatBytes(vm.ram.mappedBytes)} mapped in ${vm.ram.mappings} mapping(s), ` +
        `${int(vm.lockedPages)} pages locked`,
    ],
    ['vCPUs', `${vm.vcpus.count} (${vm.vcpus.state}), ${formatBytes(vm.vcpus.bytesWritten)} written`],
    [
      'bytes dirtied',
      `${formatBytes(vm.bytesDirtied.total)} (vCPUs ${formatBytes(vm.bytesDirtied.vcpus)}, ` +
        `device DMA ${formatBytes(vm.bytesDirtied.deviceDma)}, emulated ${formatBytes(vm.bytesDirtied.emulatedDevices)})`,
    ],
    ['DMA faults', String(vm.dmaFaults)],
  ];
  if (vm.error) rows.push(['error', vm.error.message]);
  for (const [k, v] of rows) summary.push({ [k]: v });

  const blocks = new Table({
    head: ['RAM block', 'GPA', 'size', 'plugged'],
    style: { ...PLAIN, compact: true },
  });
  for (const b of vm.ram.blocks)
    blocks.push([b.name, hex(b.gpa), formatBytes(b.sizeBytes), formatBytes(b.pluggedBytes)]);

  const out = [`VM ${vm.name}`, summary.toString(), blocks.toString()];
  if (vm.devices.length > 0) {
    const devices = new Table({
      head: ['device', 'type', 'migration state', 'DMA read', 'DMA written', 'faults'],
      style: { ...PLAIN, compact: true },
    });
    for (const d of vm.devices) {
      devices.push([
        d.name,
        d.type,
        d.migrationState,
        formatBytes(d.bytesRead),
        formatBytes(d.bytesWritten),
        d.faults,
      ]);
    }
    out.push(devices.toString());
  }
  if (vm.emulatedDevices.length > 0) {
    const emulated = new Table({ head: ['emulated device', 'details'], style: { ...PLAIN, compact: true } });
    for (const e of vm.emulatedDevices) {
      const { name, ...rest } = e as { name: string } & Record<string, unknown>;
      emulated.push([
        name,
        Object.entries(rest)
          .map(([k, v]) => `${k} ${String(v)}`)
          .join(', '),
      ]);
    }
    out.push(emulated.toString());
  }
  return out.join('\n');
}

export function renderVmList(vms: readonly VmSummaryWire[]): string {
  if (vms.length === 0) return 'no VMs';
  const table = new Table({
    head: ['VM', 'state', 'iommu', 'accounting', 'RAM', 'vCPUs', 'devices', 'error'],
    style: { ...PLAIN, compact: true },
  });
  for (const vm of vms) {
    table.push([
      vm.name,
      vm.state,
      vm.iommu,
      vm.accounting,
      formatBytes(vm.ramBytes),
      vm.vcpus,
      vm.devices.join(' '),
      vm.error?.code ?? '',
    ]);
  }
  return table.toString();
}

export function renderDigest(d: VmDigestWire): string {
  return `${d.digest}  ${d.name} (${d.state}, ${formatBytes(d.bytesDirtied)} dirtied)`;
}

const asRecord = (v: unknown): Record<string, unknown> =>
  typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : {};

/**
 * The numbers of a typed error, one line each: the mapping estimate against the limit, the pin
 * limit and what was charged. The message says the rest (cause and remedy).
 */
export function renderErrorDetails(code: string, details: Record<string, unknown> | undefined): string[] {
  if (details === undefined) return [];
  if (code === 'ERR_DMA_MAPPING_LIMIT') {
    const e = asRecord(details.estimate);
    return [
      `DMA mappings needed: ${String(e.mappings)} = ${String(e.discardBlocks)} blocks in ${String(e.discardSections)} ` +
        `discardable region(s) + ${String(e.maxMemslots)} memory slots - ${String(e.discardSections)}`,
      `type1 container limit: ${String(details.limit)}${details.limitReported ? ' (DMA_AVAIL)' : ' (assumed)'}`,
    ];
  }
  if (code === 'ERR_GUEST_RAM_PIN') {
    const limit = asRecord(details.limit);
    const section = asRecord(details.section);
    const limitText =
      limit.kind === 'pinned.max'
        ? `pinned.max of cgroup ${String(limit.cgroup)}: ${formatBytes(String(limit.bytes))}`
        : `RLIMIT_MEMLOCK ${formatBytes(String(limit.bytes))}`;
    return [
      `accounting mode: ${String(details.accountingMode)} (${String(details.backend)})`,
      `limit hit: ${limitText}`,
      `pages locked when refused: ${String(details.lockedPages)}`,
      `section: ${String(section.ramBlock)} [${hex(String(section.iova ?? 0))}, +${formatBytes(String(section.lengthBytes))})`,
    ];
  }
  return [];
}
