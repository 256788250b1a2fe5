import { PAGE_SIZE_N, U32_MAX, U64_MAX } from '../../uapi/arch.js';
import { kernelError, VfioError } from '../../uapi/error.js';
import { type IovaRange } from '../../uapi/iommufd.js';
import {
  VFIO_API_VERSION,
  VfioDmaMapFlag,
  VfioDmaUnmapFlag,
  VfioExtension,
  VfioIommuInfoCapId,
  VfioIommuInfoFlag,
} from '../../uapi/vfio-type1.js';
import type { Process } from '../host/host.js';
import {
  checkU64,
  PAGE_MASK,
  SOFT_IOMMU_PGSIZE_BITMAP,
  type VfioContainerApi,
  type VfioDmaMapArgs,
  type VfioDmaUnmapArgs,
  type VfioIommuInfo,
} from '../vfio/container-api.js';
import { IommufdContext, type IoasObject } from './context.js';
import { IoasDmaSpace } from './dma-space.js';
import { AreaProt } from './io-pagetable.js';

/**
 * iommufd's VFIO compatibility layer (drivers/iommu/iommufd/vfio_compat.c): the legacy container
 * ioctls served by an iommufd opened through /dev/vfio/vfio, working on the fd's compat IOAS
 * (IOMMU_VFIO_IOAS). Where it differs from the real type1 driver (VfioContainer):
 *
 * - No compat IOAS (no group attached, none SET) -> ENODEV for SET_IOMMU, GET_INFO, MAP, UNMAP,
 *   CHECK_EXTENSION(DMA_CC); type1 answers EINVAL before VFIO_SET_IOMMU and needs a group first.
 * - CHECK_EXTENSION(VFIO_UPDATE_VADDR) is always 0: MAP with VADDR and UNMAP with VADDR are
 *   EINVAL (unknown flags); live update uses IOAS_CHANGE_PROCESS with MAP_FILE instead.
 * - UNMAP takes only FLAG_ALL: GET_DIRTY_BITMAP is EINVAL (no container dirty tracking).
 * - MAP has no READ/WRITE check (flags 0 maps memory the device can neither read nor write), no
 *   dma_entry_limit (DMA_AVAIL reports U32_MAX, the limit is memory accounting), and no IOMMU
 *   page-size alignment before a device is attached (IOVA alignment 1); iova + size overflowing is
 *   EOVERFLOW (type1: EINVAL).
 * - UNMAP follows iommufd: a range cutting a mapping is ENOENT (type1 v2: EINVAL), nothing in the
 *   range is ENOENT (type1: success, size 0); whole mappings below an offending one are already
 *   gone. SET_IOMMU(TYPE1) turns large pages off on the IOAS so that v1 unmaps can split
 *   mappings: the exact range goes (type1 v1: all of a mapping whose first byte is covered, or
 *   nothing when the range starts inside one).
 * - GET_INFO has no MIGRATION capability; its chain is DMA_AVAIL then IOVA_RANGE.
 * - Pins are charged per the fd's RLIMIT_MODE (1 = per mm when opened here) and also move
 *   `mm->pinned_vm`; the same pages mapped twice are charged twice, as with type1.
 */
export class IommufdVfioCompat implements VfioContainerApi {
  /** The iommufd behind the container fd: the same open file. */
  readonly iommufd: IommufdContext;

  private constructor(ctx: IommufdContext) {
    this.iommufd = ctx;
  }

  /** open("/dev/vfio/vfio") served by iommufd: an iommufd context in per-mm accounting mode. */
  static open(process: Process, options: { thp?: boolean } = {}): IommufdVfioCompat {
    return new IommufdVfioCompat(IommufdContext.open(process, { compat: true, ...options }));
  }

  /** The container ioctls on an iommufd context opened any way (e.g. /dev/iommu). */
  static of(ctx: IommufdContext): IommufdVfioCompat {
    return new IommufdVfioCompat(ctx);
  }

  get caller(): Process {
    return this.iommufd.caller;
  }

  as(process: Process): IommufdVfioCompat {
    return new IommufdVfioCompat(this.iommufd.as(process));
  }

  getApiVersion(): number {
    return VFIO_API_VERSION;
  }

  /** `iommufd_vfio_check_extension`. */
  checkExtension(ext: number): number {
    switch (ext) {
      case VfioExtension.TYPE1_IOMMU:
      case VfioExtension.TYPE1v2_IOMMU:
      case VfioExtension.UNMAP_ALL:
        return 1;
      case VfioExtension.DMA_CC_IOMMU:
        // Every softvfio HWPT enforces cache coherency.
        this.iommufd.compatIoas('VFIO_CHECK_EXTENSION');
        return 1;
      default:
        // TYPE1_NESTING (obsolete) and UPDATE_VADDR ("hard to see how this could be implemented
        // safely"): 0.
        return 0;
    }
  }

  /** `iommufd_vfio_set_iommu`: TYPE1 or TYPE1v2 (EINVAL), needs the compat IOAS (ENODEV). */
  setIommu(type: number): void {
    const op = 'VFIO_SET_IOMMU';
    if (type !== VfioExtension.TYPE1_IOMMU && type !== VfioExtension.TYPE1v2_IOMMU) {
      throw kernelError('EINVAL', `unsupported IOMMU type ${type}`, { op });
    }
    const ioas = this.iommufd.compatIoas(op);
    if (type === VfioExtension.TYPE1_IOMMU) {
      try {
        ioas.iopt.disableLarge();
      } catch (err) {
        throw reOp(err, op);
      }
    }
  }

  /** `iommufd_vfio_iommu_get_info`. */
  iommuGetInfo(): VfioIommuInfo {
    const ioas = this.iommufd.compatIoas('VFIO_IOMMU_GET_INFO');
    return {
      flags: VfioIommuInfoFlag.PGSIZES | VfioIommuInfoFlag.CAPS,
      iovaPgsizes: pageSizes(ioas),
      caps: [
        { id: VfioIommuInfoCapId.DMA_AVAIL, version: 1, avail: U32_MAX },
        {
          id: VfioIommuInfoCapId.IOVA_RANGE,
          version: 1,
          iovaRanges: ioas.iopt.usableRanges().map((r) => ({ start: r.start, end: r.last })),
        },
      ],
    };
  }

  /** `iommufd_vfio_map_dma`: READ | WRITE only; a fixed-IOVA IOAS map of the caller's memory. */
  mapDma(args: VfioDmaMapArgs): void {
    const op = 'VFIO_IOMMU_MAP_DMA';
    if ((args.flags & ~(VfioDmaMapFlag.READ | VfioDmaMapFlag.WRITE)) !== 0) {
      throw kernelError('EINVAL', `unsupported flags 0x${args.flags.toString(16)}`, { op });
    }
    checkU64(args.iova, 'iova', op);
    checkU64(args.vaddr, 'vaddr', op);
    checkU64(args.size, 'size', op);
    const prot =
      (args.flags & VfioDmaMapFlag.READ ? AreaProt.READ : 0) |
      (args.flags & VfioDmaMapFlag.WRITE ? AreaProt.WRITE : 0);
    const ioas = this.iommufd.compatIoas(op);
    this.iommufd.compatMapUserPages(ioas, args.vaddr, args.size, args.iova, prot, op);
  }

  /** `iommufd_vfio_unmap_dma`: FLAG_ALL only; iommufd unmap rules, with cuts when large pages are off. */
  unmapDma(args: VfioDmaUnmapArgs): { size: bigint } {
    const op = 'VFIO_IOMMU_UNMAP_DMA';
    if ((args.flags & ~VfioDmaUnmapFlag.ALL) !== 0) {
      throw kernelError('EINVAL', `unsupported flags 0x${args.flags.toString(16)}`, { op });
    }
    checkU64(args.iova, 'iova', op);
    checkU64(args.size, 'size', op);
    const iopt = this.iommufd.compatIoas(op).iopt;
    let unmapped: bigint;
    try {
      if (args.flags & VfioDmaUnmapFlag.ALL) {
        if (args.iova !== 0n || args.size !== 0n)
          throw kernelError('EINVAL', 'UNMAP_ALL needs iova = size = 0');
        unmapped = iopt.unmapAll();
      } else {
        if (iopt.disableLargePages) {
          // Cut at the last byte of the range and just below it (not below IOVA 0).
          const cuts = [(args.iova + args.size - 1n) & U64_MAX];
          if (args.iova !== 0n) cuts.push(args.iova - 1n);
          iopt.cutIova(cuts);
        }
        if (args.size === 0n) throw kernelError('EINVAL', 'size 0');
        const last = args.iova + args.size - 1n;
        if (last > U64_MAX) throw kernelError('EOVERFLOW', 'iova + size overflows');
        unmapped = iopt.unmapRange(args.iova, last);
      }
    } catch (err) {
      throw reOp(err, op);
    }
    args.size = unmapped;
    return { size: unmapped };
  }

  // ---- groups and devices -------------------------------------------------------------------

  /**
   * A VFIO device of a group set to this container and opened: the compat IOAS is created if
   * missing (`iommufd_vfio_compat_ioas_create`), the device bound and attached to it (its domain
   * fills: EFAULT/ENOMEM/EADDRINUSE undo the bind). Returns the iommufd device id.
   */
  attachDevice(options: { name: string; reservedIovaRanges?: IovaRange[] }): {
    devId: number;
    ioasId: number;
  } {
    const ioas = this.iommufd.compatIoasCreate();
    const { outDevid } = this.iommufd.bindDevice(options);
    try {
      this.iommufd.attachIoas({ devId: outDevid, ptId: ioas.id });
    } catch (err) {
      this.iommufd.unbindDevice(outDevid);
      throw err;
    }
    return { devId: outDevid, ioasId: ioas.id };
  }

  /** Closing the device fd: detached and unbound. */
  detachDevice(devId: number): void {
    this.iommufd.unbindDevice(devId);
  }

  /** The device's DMA through its IOAS. */
  dmaSpace(devId: number): IoasDmaSpace {
    return new IoasDmaSpace(this.iommufd, devId);
  }
}

/** `iommufd_get_pagesizes`: what every domain supports (PAGE_SIZE granular), at least the IOVA alignment. */
function pageSizes(ioas: IoasObject): bigint {
  let bitmap = U64_MAX;
  if (ioas.iopt.domainCount > 0) bitmap &= SOFT_IOMMU_PGSIZE_BITMAP;
  if ((bitmap & ~PAGE_MASK) !== 0n) bitmap = (bitmap & PAGE_MASK) | PAGE_SIZE_N;
  const align = ioas.iopt.iovaAlignment;
  return bitmap > align ? bitmap : align;
}

/** The same errno, reported by the container ioctl `op`. */
function reOp(err: unknown, op: string): unknown {
  if (err instanceof VfioError && err.errno !== undefined && err.op !== op) {
    return kernelError(err.errno, err.message, { op, cause: err });
  }
  return err;
}
