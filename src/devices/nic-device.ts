import { invalidArgument } from '../uapi/error.js';
import type { DmaPort } from '../kernel/vfio/dma-port.js';
import { MigFeature } from '../uapi/migration.js';
import type { SampleDevice, SampleDeviceFactory, SampleDeviceOptions } from './sample-device.js';
import { deviceDma, StateDriver, StateSampleDevice, xorshift32 } from './state/state-driver.js';
import { DeviceStateImage } from './state/state-region.js';

export interface NicRing {
  /** IOVA of the first buffer; buffer i is at iova + i * bufferBytes. */
  iova: bigint;
  entries: number;
  /** Size of one buffer: a u32 packet length, then the packet. */
  bufferBytes: number;
}

export interface NicDeviceOptions extends SampleDeviceOptions {
  /** Flow table size (default 8 MiB), 64-byte entries. */
  flowTableBytes?: number;
  /** Receive ring in guest memory; packets are DMA-written there while running and not quiesced. */
  rxRing?: NicRing;
  /**
   * Transmit ring in guest memory. The guest owns a buffer while its length word is 0 and hands it
   * to the NIC by writing a packet and a non-zero length; the NIC, at TX_HEAD, DMA-reads the packet,
   * sends it (TX_PACKETS, TX_BYTES, TX_HASH over the bytes sent) and gives the buffer back by
   * DMA-writing a zero length.
   */
  txRing?: NicRing;
}

const FLOW_ENTRY_BYTES = 64;
const FILTER_TABLE_BYTES = 64 * 1024;
const FILTER_ENTRY_BYTES = 32;
/** Queue indices and counters. */
export const NIC_REG = {
  PRNG: 0,
  RX_HEAD: 8,
  TX_HEAD: 12,
  RX_PACKETS: 16,
  RX_BYTES: 24,
  TX_PACKETS: 32,
  FLOW_UPDATES: 40,
  RX_DROPPED: 48,
  /** DMA faults the NIC met (the IOMMU refused an RX ring write), and the IOVA of the last one. */
  DMA_FAULTS: 56,
  LAST_FAULT_IOVA: 64,
  TX_BYTES: 72,
  /** FNV-1a (32-bit) over every byte sent, so what was sent is part of the state. */
  TX_HASH: 80,
  /** TX buffers whose length word was larger than the buffer: given back unsent. */
  TX_ERRORS: 88,
} as const;
const R = NIC_REG;

/**
 * A NIC: filter table, flow table, queue indices and counters. Running, it updates flows and
 * counters and receives packets into the guest RX ring by DMA; P2P-quiesced it does no DMA (packets
 * are dropped and counted); stopped it does nothing.
 *
 * A ring write the IOMMU refuses (unmapped or read-only IOVA) is the NIC's to report: the packet is
 * dropped (RX_DROPPED), DMA_FAULTS counts it and LAST_FAULT_IOVA keeps where; the ring head stays,
 * nothing of the packet reaches guest memory, and work() goes on. The NIC tracks its own DMA writes
 * (DMA_LOGGING_* features); without a DMA port it gets an unattached one, where every DMA faults.
 */
export function createNicDevice(options: NicDeviceOptions = {}): SampleDevice & { driver: StateDriver } {
  const flowTableBytes = options.flowTableBytes ?? 8 << 20;
  if (
    !Number.isSafeInteger(flowTableBytes) ||
    flowTableBytes < FLOW_ENTRY_BYTES ||
    flowTableBytes % FLOW_ENTRY_BYTES
  ) {
    throw invalidArgument(`nic: flowTableBytes ${flowTableBytes} must be a positive multiple of 64`);
  }
  const ring = options.rxRing;
  const tx = options.txRing;
  for (const [name, r] of [
    ['rxRing', ring],
    ['txRing', tx],
  ] as const) {
    if (r && (r.entries < 1 || r.bufferBytes < 128 || !Number.isSafeInteger(r.entries * r.bufferBytes))) {
      throw invalidArgument(`nic: ${name} needs entries >= 1 and bufferBytes >= 128`);
    }
  }
  const image = new DeviceStateImage(
    'nic',
    1,
    [
      { name: 'filters', sizeBytes: FILTER_TABLE_BYTES, precopy: true },
      { name: 'flows', sizeBytes: flowTableBytes, precopy: true },
      { name: 'registers', sizeBytes: 4096, precopy: false },
    ],
    JSON.stringify({
      rxRing: ring ? [ring.entries, ring.bufferBytes] : null,
      txRing: tx ? [tx.entries, tx.bufferBytes] : null,
    }),
  );
  const filters = image.region('filters');
  const flows = image.region('flows');
  const regs = image.region('registers');
  const seed = options.seed ?? 1;
  const driver = new StateDriver(
    image,
    options.migrationFlags ?? MigFeature.STOP_COPY | MigFeature.P2P | MigFeature.PRE_COPY,
    (fresh) => {
      if (!fresh) for (const r of image.regions) r.clear();
      regs.setU32(R.PRNG, seed >>> 0 || 1);
      regs.setU32(R.TX_HASH, FNV_OFFSET);
    },
    { dmaLogging: true },
  );
  const faultRegs = { count: R.DMA_FAULTS, lastIova: R.LAST_FAULT_IOVA };
  const flowCount = flowTableBytes / FLOW_ENTRY_BYTES;
  const packet = ring ? new Uint8Array(ring.bufferBytes) : undefined;
  const packetWords = packet ? new Uint32Array(packet.buffer, 0, packet.length >>> 2) : undefined;
  const txLength = new Uint8Array(4);
  const txLengthView = new DataView(txLength.buffer);
  const txPacket = tx ? new Uint8Array(tx.bufferBytes) : undefined;
  const zero = new Uint8Array(4);

  /** Send the packet the guest left at TX_HEAD, if it did. */
  const transmit = (dma: DmaPort, ring: NicRing, packet: Uint8Array): void => {
    const head = regs.u32(R.TX_HEAD);
    const slot = ring.iova + BigInt(head) * BigInt(ring.bufferBytes);
    if (!deviceDma(regs, faultRegs, () => dma.read(slot, txLength))) return;
    const length = txLengthView.getUint32(0, true);
    if (length === 0) return; // the guest has not handed this buffer over
    if (length > ring.bufferBytes - 4) {
      regs.setU64(R.TX_ERRORS, regs.u64(R.TX_ERRORS) + 1n);
    } else {
      const bytes = packet.subarray(0, length);
      if (!deviceDma(regs, faultRegs, () => dma.read(slot + 4n, bytes))) return;
      regs.setU32(R.TX_HASH, fnv1a(regs.u32(R.TX_HASH), bytes));
      regs.setU64(R.TX_PACKETS, regs.u64(R.TX_PACKETS) + 1n);
      regs.setU64(R.TX_BYTES, regs.u64(R.TX_BYTES) + BigInt(length));
    }
    if (!deviceDma(regs, faultRegs, () => dma.write(slot, zero))) return;
    regs.setU32(R.TX_HEAD, (head + 1) % ring.entries);
  };

  const fillWords = (words: Uint32Array, count: number, x: number): number => {
    for (let i = 0; i < count; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      words[i] = x;
    }
    return x >>> 0;
  };

  return new StateSampleDevice(options.name ?? 'nic0', driver, options.dma, (dma) => {
    let x = xorshift32(regs.u32(R.PRNG));
    // a flow update
    const entry = flows.mutate((x % flowCount) * FLOW_ENTRY_BYTES, FLOW_ENTRY_BYTES);
    x = fillWords(new Uint32Array(entry.buffer, entry.byteOffset, FLOW_ENTRY_BYTES / 4), 16, x);
    regs.setU64(R.FLOW_UPDATES, regs.u64(R.FLOW_UPDATES) + 1n);
    // now and then a filter rule
    if (x % 8 === 0) {
      const slot = (x >>> 3) % (FILTER_TABLE_BYTES / FILTER_ENTRY_BYTES);
      const rule = filters.mutate(slot * FILTER_ENTRY_BYTES, FILTER_ENTRY_BYTES);
      x = fillWords(new Uint32Array(rule.buffer, rule.byteOffset, FILTER_ENTRY_BYTES / 4), 8, x);
    }
    if (dma && tx && txPacket) transmit(dma, tx, txPacket);
    // a received packet
    if (ring && packet && packetWords) {
      x = xorshift32(x);
      const length = 60 + (x % (ring.bufferBytes - 4 - 60 + 1));
      if (dma) {
        x = fillWords(packetWords.subarray(1), Math.ceil(length / 4), x);
        packetWords[0] = length;
        const head = regs.u32(R.RX_HEAD);
        const iova = ring.iova + BigInt(head) * BigInt(ring.bufferBytes);
        if (deviceDma(regs, faultRegs, () => dma.write(iova, packet.subarray(0, 4 + length)))) {
          regs.setU32(R.RX_HEAD, (head + 1) % ring.entries);
          regs.setU64(R.RX_PACKETS, regs.u64(R.RX_PACKETS) + 1n);
          regs.setU64(R.RX_BYTES, regs.u64(R.RX_BYTES) + BigInt(length));
        } else {
          regs.setU64(R.RX_DROPPED, regs.u64(R.RX_DROPPED) + 1n);
        }
      } else {
        regs.setU64(R.RX_DROPPED, regs.u64(R.RX_DROPPED) + 1n);
      }
    }
    regs.setU32(R.PRNG, x);
  });
}

export const nicDeviceFactory: SampleDeviceFactory<NicDeviceOptions> = {
  type: 'nic',
  description: 'NIC with filter and flow tables and an RX ring (STOP_COPY|P2P|PRE_COPY, DMA logging)',
  create: createNicDevice,
};

const FNV_OFFSET = 0x811c9dc5;

function fnv1a(hash: number, bytes: Uint8Array): number {
  let h = hash;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i]!, 0x01000193);
  return h >>> 0;
}
