/**
 * The bytes behind a memory mapping or a memfd, as the kernel reaches them (page cache, anonymous
 * pages): process reads and writes, pinned-page access, device DMA through an IOMMU all end here.
 * Offsets are bytes from the start of the store; callers check ranges against `lengthBytes`.
 */
export interface ByteStore {
  readonly lengthBytes: number;
  /** Bytes that hold memory now (allocated), at most `lengthBytes`. */
  readonly residentBytes: number;
  read(offset: number, target: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}
