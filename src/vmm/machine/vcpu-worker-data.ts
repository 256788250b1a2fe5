import type { ResolvedWorkload } from './vcpu-workload.js';

/** One RAM block as a vCPU worker sees it: shared buffers only (structured-cloneable). */
export interface VcpuWorkerBlock {
  name: string;
  pages: number;
  /** The PhysMemory's SharedArrayBuffers, 1 GiB each but the last. */
  segments: SharedArrayBuffer[];
  /** The block's DirtyLog buffer. */
  dirtyLog: SharedArrayBuffer;
  /** Plug state of a discardable block: one i32 per block of `pagesPerBlock` pages, 1 = plugged. */
  plug?: { states: SharedArrayBuffer; pagesPerBlock: number };
}

/** The `workerData` of a vCPU worker. */
export interface VcpuWorkerData {
  vcpu: number;
  vcpus: number;
  /** The VcpuSet's control block (see vcpu-control.ts). */
  control: SharedArrayBuffer;
  /** The guest RAM's RamAccessFence buffer and this vCPU's slot in it. */
  fence: SharedArrayBuffer;
  fenceSlot: number;
  blocks: VcpuWorkerBlock[];
  workload: ResolvedWorkload;
}
