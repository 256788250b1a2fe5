import { invalidArgument } from '../../uapi/error.js';
import { GUEST_PAGE_BYTES } from './guest-page.js';
import { guestRamDigest } from './guest-ram-digest.js';
import { RamAccessFence } from './ram-access-fence.js';
import { RamBlock, type RamBlockOptions } from './ram-block.js';

/**
 * The guest RAM of one VM: RAM blocks at distinct guest-physical ranges, the fence that vCPU
 * threads and unplugs share, and the dirty log of every block.
 *
 * Blocks are listed in the order they were added; vCPU workloads address RAM as the concatenation
 * of the blocks in that order ("guest RAM offsets"). Add blocks before starting vCPUs: a VcpuSet
 * sees the blocks that exist when it starts.
 */
export class GuestRam {
  readonly fence = new RamAccessFence();
  readonly #blocks: RamBlock[] = [];

  /** Add a RAM block; its name must be unused and its GPA range must not overlap another's. */
  addBlock(options: RamBlockOptions): RamBlock {
    if (this.#blocks.some((b) => b.name === options.name)) {
      throw invalidArgument(`RAM block ${options.name} already exists`);
    }
    const block = new RamBlock(options, this.fence);
    const clash = this.#blocks.find((b) => block.gpa < b.endGpa && b.gpa < block.endGpa);
    if (clash !== undefined) {
      throw invalidArgument(
        `RAM block ${block.name} [${block.gpa}, ${block.endGpa}) overlaps ${clash.name} [${clash.gpa}, ${clash.endGpa})`,
      );
    }
    this.#blocks.push(block);
    return block;
  }

  get blocks(): readonly RamBlock[] {
    return this.#blocks;
  }

  get totalBytes(): number {
    return this.#blocks.reduce((n, b) => n + b.sizeBytes, 0);
  }

  get totalPages(): number {
    return this.totalBytes / GUEST_PAGE_BYTES;
  }

  /** The block with this name. */
  block(name: string): RamBlock {
    const block = this.#blocks.find((b) => b.name === name);
    if (block === undefined) throw invalidArgument(`no RAM block named ${name}`);
    return block;
  }

  /** The block holding `[gpa, gpa + lengthBytes)` and the offset of `gpa` in it. */
  lookup(gpa: bigint, lengthBytes = 1): { block: RamBlock; offset: number } {
    const block = this.#blocks.find((b) => b.contains(gpa, Math.max(1, lengthBytes)));
    if (block === undefined) {
      throw invalidArgument(`guest-physical range [${gpa}, +${lengthBytes}) is not inside one RAM block`);
    }
    return { block, offset: Number(gpa - block.gpa) };
  }

  /** Read guest memory at a guest-physical address (inside one block). */
  read(gpa: bigint, target: Uint8Array): void {
    const { block, offset } = this.lookup(gpa, target.length);
    block.read(offset, target);
  }

  /** Write guest memory from the host thread (inside one block), marking dirty pages. */
  write(gpa: bigint, data: Uint8Array): void {
    const { block, offset } = this.lookup(gpa, data.length);
    block.write(offset, data);
  }

  /** Is dirty logging on (for every block)? */
  get dirtyLogActive(): boolean {
    return this.#blocks.length > 0 && this.#blocks.every((b) => b.dirtyLog.active);
  }

  /** Start dirty logging on every block (QEMU's log_global_start for KVM). */
  startDirtyLog(): void {
    if (this.#blocks.some((b) => b.dirtyLog.active))
      throw invalidArgument('dirty logging is already started');
    for (const b of this.#blocks) b.dirtyLog.start();
  }

  /** Sync and clear every block's dirty log: block name → bitmap of pages dirtied since the last sync. */
  syncDirtyLog(): Map<string, Uint32Array> {
    const out = new Map<string, Uint32Array>();
    for (const b of this.#blocks) out.set(b.name, b.dirtyLog.syncAndClear());
    return out;
  }

  stopDirtyLog(): void {
    if (!this.dirtyLogActive) throw invalidArgument('dirty logging is not started');
    for (const b of this.#blocks) b.dirtyLog.stop();
  }

  /** Digest of all guest RAM (see guestRamDigest). */
  digest(): string {
    return guestRamDigest(this.#blocks);
  }
}
