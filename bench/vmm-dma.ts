import { pathToFileURL } from 'node:url';
import { NIC_REG } from '../src/devices/nic-device.js';
import { Host } from '../src/kernel/host/index.js';
import type { DmaSpace } from '../src/kernel/vfio/dma-port.js';
import { HWPT_DIRTY_TRACKING_ENABLE } from '../src/uapi/iommufd.js';
import { IommufdBackend } from '../src/vmm/machine/iommufd-backend.js';
import { Machine } from '../src/vmm/machine/machine.js';
import { type BenchResult, machineLine } from './report.js';

const GiB = 2 ** 30;
const RING = { entries: 256, bufferBytes: 2048 };
/** Each measurement runs at least this long; the best of RUNS is kept. */
const RUN_MS = 250;
const RUNS = 3;

export interface VmmDmaRow {
  /** What one DMA writes: the u32 length and the packet ('mixed': 60-2044 byte packets, as the nic's). */
  label: string;
  /** Mean bytes per DMA write. */
  writeBytes: number;
  /** Through the device's IoasDmaSpace (IOVA -> area -> pages -> guest RAM), MB/s. */
  dmaMBps: number;
  /** The same with the HWPT's dirty tracking on (as while migrating), MB/s. */
  dmaDirtyMBps: number;
  /** Buffer.copy of the same sizes to the same ring offsets of a plain Buffer, MB/s. */
  copyMBps: number;
}

export interface VmmDmaFigures {
  rows: VmmDmaRow[];
  /** The nic's own work(): flow and filter updates, packet generation, RX DMA, counters. */
  nic: { packetsPerS: number; ringMBps: number; meanWriteBytes: number };
}

/** Lengths of `n` writes of the nic's packet mix: a u32 length and 60-2044 bytes, xorshift-drawn. */
function mixedLengths(n: number): Uint16Array {
  const out = new Uint16Array(n);
  let x = 0x9e3779b9;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = 4 + 60 + ((x >>> 0) % (RING.bufferBytes - 4 - 60 + 1));
  }
  return out;
}

/** Best bytes/s of `loop` over RUNS runs of at least RUN_MS; `loop(batch)` returns bytes moved. */
function bestRate(loop: (batch: number) => number): number {
  let best = 0;
  for (let r = 0; r < RUNS; r++) {
    let bytes = 0;
    const t0 = performance.now();
    let elapsed = 0;
    while (elapsed < RUN_MS) {
      bytes += loop(4096);
      elapsed = performance.now() - t0;
    }
    best = Math.max(best, bytes / (elapsed / 1000));
  }
  return best;
}

/**
 * Device DMA through the IOAS: a 1 GiB guest on iommufd (RAM mapped from its memfd, pinned, the
 * nic attached), packets written into the nic's RX ring in guest RAM through its IoasDmaSpace,
 * against Buffer.copy of the same sizes into a plain Buffer the ring's size, in the same run.
 */
export async function benchVmmDmaFigures(): Promise<VmmDmaFigures> {
  const host = new Host();
  const vm = Machine.create(host, {
    name: 'bench-dma',
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: GiB }],
    // One vCPU that writes nothing, and no device work from the guest driver: the DMA runs alone.
    vcpus: { count: 1, workload: { pageWriteLimit: 0 } },
    devices: [{ type: 'nic', name: 'nic0', rxRing: RING, flowTableBytes: 1 << 20, workUnitsPerTick: 0 }],
    guestDriverIntervalMs: 1000,
  });
  try {
    await vm.start();
    const backend = vm.backend;
    if (!(backend instanceof IommufdBackend)) throw new Error('expected the iommufd backend');
    const space: DmaSpace = backend.deviceSpace('nic0');
    const nic = vm.device('nic0');
    const ring = nic.buffer!;
    const target = Buffer.alloc(ring.bytes);
    const packet = Buffer.alloc(RING.bufferBytes);
    for (let i = 0; i < packet.length; i++) packet[i] = (i * 131 + 7) & 0xff;
    const offsets = Array.from({ length: RING.entries }, (_, i) => i * RING.bufferBytes);
    const iovas = offsets.map((o) => ring.gpa + BigInt(o));
    const views = new Map<number, Uint8Array>();
    const view = (n: number) => {
      let v = views.get(n);
      if (v === undefined) views.set(n, (v = packet.subarray(0, n)));
      return v;
    };

    const measure = (label: string, lengths: Uint16Array) => {
      const n = lengths.length;
      let at = 0;
      const dma = () =>
        bestRate((batch) => {
          let bytes = 0;
          for (let i = 0; i < batch; i++, at++) {
            const len = lengths[at % n]!;
            space.write(iovas[at % RING.entries]!, view(len));
            bytes += len;
          }
          return bytes;
        });
      const copy = () =>
        bestRate((batch) => {
          let bytes = 0;
          for (let i = 0; i < batch; i++, at++) {
            const len = lengths[at % n]!;
            packet.copy(target, offsets[at % RING.entries]!, 0, len);
            bytes += len;
          }
          return bytes;
        });
      const { hwptId } = backend.device('nic0');
      const copyMBps = copy() / 1e6;
      const dmaMBps = dma() / 1e6;
      backend.ctx.hwptSetDirtyTracking({ hwptId, flags: HWPT_DIRTY_TRACKING_ENABLE });
      const dmaDirtyMBps = dma() / 1e6;
      backend.ctx.hwptSetDirtyTracking({ hwptId, flags: 0 });
      const writeBytes = lengths.reduce((s, l) => s + l, 0) / n;
      return { label, writeBytes, dmaMBps, dmaDirtyMBps, copyMBps };
    };

    const rows: VmmDmaRow[] = [];
    for (const size of [64, 512, 1500, RING.bufferBytes - 4]) {
      rows.push(measure(`${size} B packets`, new Uint16Array([size + 4])));
    }
    rows.push(measure('mixed 60-2044 B packets', mixedLengths(65536)));

    // The nic itself: work() receives one packet per unit into the ring, through the same space.
    const regs = nic.device.driver.image.region('registers');
    const packets0 = regs.u64(NIC_REG.RX_PACKETS);
    const written0 = nic.dma.counters.bytesWritten;
    let units = 0;
    const t0 = performance.now();
    while (performance.now() - t0 < RUNS * RUN_MS) {
      nic.device.work(256);
      units += 256;
    }
    const seconds = (performance.now() - t0) / 1000;
    const packets = Number(regs.u64(NIC_REG.RX_PACKETS) - packets0);
    const written = nic.dma.counters.bytesWritten - written0;
    if (packets !== units) throw new Error(`the nic received ${packets} of ${units} packets`);
    return {
      rows,
      nic: {
        packetsPerS: packets / seconds,
        ringMBps: written / seconds / 1e6,
        meanWriteBytes: written / packets,
      },
    };
  } finally {
    await vm.destroy();
  }
}

export function vmmDmaResult(f: VmmDmaFigures): BenchResult {
  const f0 = (n: number) => n.toFixed(0);
  const f2 = (n: number) => n.toFixed(2);
  const rows: BenchResult['rows'] = [];
  for (const r of f.rows) {
    rows.push({
      metric: `${r.label}: DMA / dirty-tracked DMA / Buffer.copy, MB/s`,
      value: `${f0(r.dmaMBps)} / ${f0(r.dmaDirtyMBps)} / ${f0(r.copyMBps)}`,
    });
    rows.push({ metric: `${r.label}: DMA / Buffer.copy`, value: f2(r.dmaMBps / r.copyMBps) });
  }
  const mixed = f.rows[f.rows.length - 1]!;
  rows.push({
    metric: `nic work(): packets/s, ring MB/s (mean write ${f0(f.nic.meanWriteBytes)} B)`,
    value: `${f0(f.nic.packetsPerS)}, ${f0(f.nic.ringMBps)}`,
  });
  rows.push({
    metric: 'nic work() / Buffer.copy of the mixed sizes',
    value: f2(f.nic.ringMBps / mixed.copyMBps),
  });
  return {
    title: 'vmm: device DMA through the IOAS (nic RX into a guest ring, 1 GiB guest, iommufd)',
    rows,
    notes: [
      'A started 1 GiB VM: RAM mapped with IOAS_MAP_FILE from its memfd and pinned, the nic bound and attached to a HWPT. Each DMA writes a u32 length and the packet into the next of 256 ring buffers of 2 KiB at IOVA = GPA, through the IoasDmaSpace the nic uses (translation through the IO page table, one copy into guest RAM).',
      'Buffer.copy: the same lengths into the same offsets of a plain 512 KiB Buffer, measured in the same run. Best of 3 runs of ≥ 250 ms each; MB/s counts the bytes written (length word included).',
      'Dirty-tracked: HWPT_SET_DIRTY_TRACKING on, so every write also sets the dirty bits of its IOVA pages, as while migrating.',
      "nic work(): the device's whole running work per packet (flow-table update, filter rule now and then, packet generation with xorshift, the RX DMA, counters); no vCPU writes meanwhile.",
    ],
  };
}

/** `benchVmmDma` for bench/run.ts. */
export async function benchVmmDma(): Promise<BenchResult> {
  return vmmDmaResult(await benchVmmDmaFigures());
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const result = await benchVmmDma();
  console.log(`${result.title} on ${machineLine()}`);
  for (const row of result.rows) console.log(`  ${row.metric}: ${row.value}`);
}
