import { PAGE_SIZE_N, U64_MAX } from '../../uapi/arch.js';
import { internalError, kernelError } from '../../uapi/error.js';
import { withOp } from './errors.js';
import type { AccessSeg, IoptAccess } from './io-pagetable.js';
import type { AccessObject, IoasObject, IommufdCore } from './objects.js';

/** What an access user (an emulated/mediated device driver) provides. */
export interface AccessOps {
  /**
   * Called when IOAS_UNMAP (or the access going away: iova 0, length 2^64-1) needs the pages of
   * [iova, iova + length): unpin every pin intersecting it before returning.
   */
  unmap(iova: bigint, length: bigint): void;
}

export interface AccessCreateOptions {
  /**
   * `needs_pin_pages`: the user will pin pages (IOVA alignment PAGE_SIZE). Default true; false
   * gives alignment 1 and only accessRw.
   */
  needsPinPages?: boolean;
}

/**
 * Pinned pages handed to an access user (the `struct page *` array it would kmap): byte `offset`
 * of the pinned range, read and written straight in the backing memory. Valid until unpinned.
 */
export interface AccessPinnedPages {
  readonly iova: bigint;
  readonly length: bigint;
  read(offset: number, target: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

interface Pin {
  segs: AccessSeg[];
  live: boolean;
}

/**
 * `struct iommufd_access`: an in-kernel user of one IOAS that pins pages and copies data through
 * it without a device domain. Pins go through the IOAS's pages objects and their accounting, so a
 * page is pinned and charged once whatever mix of domains and accesses hold it.
 *
 * Lifetime: the IOAS is held (destroy -> EBUSY) until `accessDestroy`. IOAS_UNMAP of an area the
 * access pinned calls `ops.unmap` and retries; a user that never unpins makes it fail EDEADLOCK.
 * An internal access (`accessCreateInternal`, as the kernel makes for HW queues) gets no unmap
 * notice: its pins lock the areas (IOAS_UNMAP -> EBUSY).
 */
export class IommufdAccess implements AccessObject, IoptAccess {
  readonly kind = 'access' as const;
  id = 0;
  readonly internal: boolean;
  readonly iovaAlignment: bigint;
  readonly #core: IommufdCore;
  readonly #ops: AccessOps | undefined;
  #ioas: IoasObject | undefined;
  /** False once destruction started: new pins fail ENOENT, unpins still work. */
  #pinnable = true;
  readonly #pins = new Map<string, Pin[]>();

  private constructor(
    core: IommufdCore,
    ioas: IoasObject,
    ops: AccessOps | undefined,
    internal: boolean,
    align: bigint,
  ) {
    this.#core = core;
    this.#ioas = ioas;
    this.#ops = ops;
    this.internal = internal;
    this.iovaAlignment = align;
  }

  /**
   * `iommufd_access_create` + `iommufd_access_attach`: bad IOAS -> ENOENT; an area not aligned to
   * the access's alignment -> EADDRINUSE (no object then).
   */
  static create(
    core: IommufdCore,
    ioasId: number,
    ops: AccessOps | undefined,
    internal: boolean,
    options: AccessCreateOptions = {},
  ): IommufdAccess {
    const op = 'ACCESS_CREATE';
    const ioas = core.objects.get(ioasId);
    if (ioas?.kind !== 'ioas') throw kernelError('ENOENT', `no IOAS ${ioasId}`, { op });
    const align = internal || (options.needsPinPages ?? true) ? PAGE_SIZE_N : 1n;
    const access = new IommufdAccess(core, ioas, ops, internal, align);
    try {
      ioas.iopt.addAccess(access);
    } catch (err) {
      throw withOp(err, op);
    }
    ioas.users++;
    return core.add(access);
  }

  /** The IOAS the access uses (undefined once destroyed). */
  get ioas(): IoasObject | undefined {
    return this.#ioas;
  }

  /** Number of live pins (each accessPin not yet undone). */
  get pinCount(): number {
    let n = 0;
    for (const list of this.#pins.values()) n += list.length;
    return n;
  }

  /** @internal IoptAccess: IOAS_UNMAP asks for [iova, iova + length) back. */
  notifyUnmap(iova: bigint, length: bigint): void {
    this.#ops?.unmap(iova, length);
  }

  #range(iova: bigint, length: bigint, op: string): bigint {
    if (length === 0n) throw kernelError('EINVAL', 'length 0', { op });
    const last = iova + length - 1n;
    if (last > U64_MAX) throw kernelError('EOVERFLOW', 'iova + length overflows', { op });
    return last;
  }

  /**
   * `iommufd_access_pin_pages`: pins the pages under [iova, iova + length). Order: access made
   * without needs_pin_pages or without an unmap op -> EINVAL; length 0 -> EINVAL; overflow ->
   * EOVERFLOW; access destroyed -> ENOENT; then per area (see IoPagetable.accessPin) EINVAL
   * (unmap in progress, source not page aligned), EPERM, EFAULT, ENOMEM; hole -> ENOENT.
   * Undo with `accessUnpin(iova, length)` (same values).
   */
  accessPin(iova: bigint, length: bigint, options: { write?: boolean } = {}): AccessPinnedPages {
    const op = 'ACCESS_PIN_PAGES';
    if (!this.internal && (this.iovaAlignment !== PAGE_SIZE_N || !this.#ops)) {
      throw kernelError('EINVAL', 'access was not created to pin pages', { op });
    }
    const last = this.#range(iova, length, op);
    const ioas = this.#ioas;
    if (!ioas || !this.#pinnable) throw kernelError('ENOENT', 'access has no IOAS', { op });
    let segs: AccessSeg[];
    try {
      segs = ioas.iopt.accessPin(iova, last, options.write ?? false, this.internal);
    } catch (err) {
      throw withOp(err, op);
    }
    const pin: Pin = { segs, live: true };
    const key = `${iova}:${length}`;
    const list = this.#pins.get(key);
    if (list) list.push(pin);
    else this.#pins.set(key, [pin]);
    return this.#pinnedView(ioas, pin, iova, length);
  }

  /**
   * `iommufd_access_unpin_pages`: undoes one accessPin of exactly (iova, length). No such pin is a
   * bug of the user (the kernel WARNs): EINVAL.
   */
  accessUnpin(iova: bigint, length: bigint): void {
    const key = `${iova}:${length}`;
    const list = this.#pins.get(key);
    const pin = list?.pop();
    if (!pin)
      throw kernelError('EINVAL', `no pin of 0x${iova.toString(16)}+0x${length.toString(16)}`, {
        op: 'ACCESS_UNPIN_PAGES',
      });
    if (list!.length === 0) this.#pins.delete(key);
    pin.live = false;
    this.#ioas!.iopt.accessUnpin(pin.segs, this.internal);
  }

  /** Pins intersecting [iova, iova + length), as (iova, length) pairs (what `ops.unmap` must undo). */
  pinsIn(iova: bigint, length: bigint): [bigint, bigint][] {
    const last = iova + length - 1n;
    const out: [bigint, bigint][] = [];
    for (const [key, list] of this.#pins) {
      const [s, l] = key.split(':').map(BigInt) as [bigint, bigint];
      if (s <= last && iova <= s + l - 1n) for (let i = 0; i < list.length; i++) out.push([s, l]);
    }
    return out;
  }

  /**
   * `iommufd_access_rw`: copies `data` to (write) or from the memory under [iova, +data.length).
   * Length 0 -> EINVAL; overflow -> EOVERFLOW; destroyed -> ENOENT; unmap in progress -> EINVAL;
   * mapping lacks the permission -> EPERM; write to read-only pages -> EPERM; unbacked -> EFAULT;
   * hole -> ENOENT.
   */
  accessRw(iova: bigint, data: Uint8Array, options: { write?: boolean } = {}): void {
    const op = 'ACCESS_RW';
    this.#range(iova, BigInt(data.length), op);
    const ioas = this.#ioas;
    if (!ioas || !this.#pinnable) throw kernelError('ENOENT', 'access has no IOAS', { op });
    try {
      ioas.iopt.accessRw(iova, data, options.write ?? false);
    } catch (err) {
      throw withOp(err, op);
    }
  }

  /**
   * `iommufd_access_destroy`: the user is told to give everything back (`unmap(0, 2^64-1)`), any
   * pin it kept is dropped (the kernel would leak it with a WARN), the IOAS is released.
   */
  accessDestroy(): void {
    const ioas = this.#ioas;
    if (!ioas) return;
    this.#pinnable = false;
    if (!this.internal) this.#ops?.unmap(0n, U64_MAX);
    for (const list of this.#pins.values()) {
      for (const pin of list) {
        pin.live = false;
        ioas.iopt.accessUnpin(pin.segs, this.internal);
      }
    }
    this.#pins.clear();
    ioas.iopt.removeAccess(this);
    ioas.users--;
    this.#ioas = undefined;
    this.#core.objects.delete(this.id);
  }

  /** @internal AccessObject: fd close. */
  release(): void {
    this.accessDestroy();
  }

  #pinnedView(ioas: IoasObject, pin: Pin, iova: bigint, length: bigint): AccessPinnedPages {
    const pages = ioas.iopt.pages;
    const iopt = ioas.iopt;
    const copy = (offset: number, buf: Uint8Array, write: boolean): void => {
      if (!pin.live) throw internalError('access used pages it has unpinned');
      if (offset < 0 || BigInt(offset + buf.length) > length) {
        throw internalError(`offset ${offset}+${buf.length} outside the pinned ${length} bytes`);
      }
      let done = 0;
      while (done < buf.length) {
        const at = iova + BigInt(offset + done);
        const a = iopt.areaAt(at);
        if (a < 0) throw internalError('pinned area vanished');
        const left = iopt.areaLast(a) - at + 1n;
        const n = left < BigInt(buf.length - done) ? Number(left) : buf.length - done;
        const id = iopt.areaPages(a);
        const addr = pages.start(id) + iopt.areaOffset(a) + (at - iopt.areaIova(a));
        const src = pages.source(id);
        const part = buf.subarray(done, done + n);
        if (src.file) {
          if (write) src.file.write(addr, part);
          else src.file.read(addr, part);
        } else if (write) src.mm!.write(addr, part, true);
        else src.mm!.read(addr, part);
        done += n;
      }
    };
    return {
      iova,
      length,
      read: (offset, target) => copy(offset, target, false),
      write: (offset, data) => copy(offset, data, true),
    };
  }
}
