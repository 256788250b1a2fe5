import type { MigrationParameters } from './migration-params.js';

/** QEMU's BUFFER_DELAY: rate-limit and bandwidth slots of 100 ms. */
export const SLOT_MS = 100;
/** Dirty rate and auto-converge are evaluated at syncs at least this far apart. */
export const DIRTY_RATE_PERIOD_MS = 1000;

/**
 * The numbers the source's migration loop steers by (QEMU's migration_update_counters,
 * migration_rate_limit, migration_trigger_throttle), with time passed in so they are testable:
 * - every slot of ≥ 100 ms: bandwidth (bytes/ms) = bytes in the slot / its length, threshold =
 *   bandwidth × downtime-limit, mbps, pages/s, expected downtime = dirty bytes at the last sync /
 *   bandwidth;
 * - max-bandwidth: a budget of max-bandwidth / 10 bytes per slot;
 * - at syncs ≥ 1 s apart: the dirty-pages rate, and auto-converge's check: bytes dirtied in the
 *   period above throttle-trigger-threshold % of bytes sent, a second time → throttle (initial,
 *   then + increment, capped at max-cpu-throttle).
 */
export class ConvergenceMeter {
  readonly #params: MigrationParameters;
  #slotStart: number;
  #slotBytes = 0;
  #slotPages = 0;
  bandwidthBytesPerMs = 0;
  mbps = 0;
  pagesPerSecond = 0;
  expectedDowntimeMs: number | undefined;
  #dirtyBytesLastSync = 0;
  #periodStart: number;
  #periodDirtyPages = 0;
  #periodSentBytes = 0;
  dirtyPagesRate = 0;
  #overThreshold = 0;
  throttlePercent = 0;

  constructor(params: MigrationParameters, nowMs: number) {
    this.#params = params;
    this.#slotStart = nowMs;
    this.#periodStart = nowMs;
  }

  /** Count bytes (and pages) sent. */
  sent(bytes: number, pages = 0): void {
    this.#slotBytes += bytes;
    this.#slotPages += pages;
    this.#periodSentBytes += bytes;
  }

  /** Bytes the migration may still send in this slot (Infinity without max-bandwidth). */
  budgetLeft(nowMs: number): number {
    this.#maybeEndSlot(nowMs);
    const max = this.#params.maxBandwidthBytesPerSec;
    if (max === 0) return Infinity;
    return max / (1000 / SLOT_MS) - this.#slotBytes;
  }

  /** When the current slot ends (to sleep until, when over budget). */
  slotEndMs(): number {
    return this.#slotStart + SLOT_MS;
  }

  /** Switch over when pending bytes are at most this (bandwidth × downtime-limit). */
  get thresholdBytes(): number {
    const avail = this.#params.availSwitchoverBandwidthBytesPerSec;
    const bandwidth = avail > 0 ? avail / 1000 : this.bandwidthBytesPerMs;
    return bandwidth * this.#params.downtimeLimitMs;
  }

  /**
   * A dirty-log sync found `dirtyPages` (`pageBytes` each). Returns the new vCPU throttle when
   * auto-converge changes it, else undefined.
   */
  synced(nowMs: number, dirtyPages: number, pageBytes: number): number | undefined {
    this.#maybeEndSlot(nowMs);
    this.#dirtyBytesLastSync = dirtyPages * pageBytes;
    this.#periodDirtyPages += dirtyPages;
    const period = nowMs - this.#periodStart;
    if (period < DIRTY_RATE_PERIOD_MS) return undefined;
    this.dirtyPagesRate = Math.round((this.#periodDirtyPages * 1000) / period);
    const dirtied = this.#periodDirtyPages * pageBytes;
    const sent = this.#periodSentBytes;
    this.#periodStart = nowMs;
    this.#periodDirtyPages = 0;
    this.#periodSentBytes = 0;
    if (!this.#params.autoConverge) return undefined;
    // QEMU's dirty_rate_high_cnt: the second period over the threshold throttles, whether the
    // two were in a row or not; only a throttle resets the count.
    if (dirtied > (sent * this.#params.throttleTriggerThresholdPercent) / 100) {
      if (++this.#overThreshold >= 2) {
        this.#overThreshold = 0;
        const next =
          this.throttlePercent === 0
            ? this.#params.cpuThrottleInitialPercent
            : this.throttlePercent + this.#params.cpuThrottleIncrementPercent;
        const capped = Math.min(next, this.#params.maxCpuThrottlePercent);
        if (capped !== this.throttlePercent) {
          this.throttlePercent = capped;
          return capped;
        }
      }
    }
    return undefined;
  }

  #maybeEndSlot(nowMs: number): void {
    const elapsed = nowMs - this.#slotStart;
    if (elapsed < SLOT_MS) return;
    this.bandwidthBytesPerMs = this.#slotBytes / elapsed;
    this.mbps = (this.#slotBytes * 8) / (elapsed / 1000) / 1e6;
    this.pagesPerSecond = Math.round((this.#slotPages * 1000) / elapsed);
    if (this.bandwidthBytesPerMs > 0 && this.#slotBytes > 10_000) {
      this.expectedDowntimeMs = Math.round(this.#dirtyBytesLastSync / this.bandwidthBytesPerMs);
    }
    this.#slotStart = nowMs;
    this.#slotBytes = 0;
    this.#slotPages = 0;
  }
}
