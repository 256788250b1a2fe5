import type { SampleDeviceFactory } from '../../../src/devices/sample-device.js';
import type { DataFdValue } from '../../../src/kernel/vfio/vfio-device.js';
import { VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { MigFeature, MigState } from '../../../src/uapi/migration.js';
import { type LedgerOptions, ledgerFactory } from './ledger-device.js';

/**
 * Ledger devices with one deliberate bug each, and the check of the kit that must catch it
 * (`category/name`, as in the report). Bugs in the driver use ledger's `flaws`; bugs in the state
 * machine walk (which the VFIO core does right) subclass VfioDevice, as a driver with its own
 * set_state loop would get them wrong.
 */

/** Returns the saving fd again on PRE_COPY(_P2P) -> STOP_COPY, an arc that opens no session. */
class FdOnStopCopyArc extends VfioDevice {
  #savingFd: DataFdValue = -1;
  override setMigDeviceState(state: number): DataFdValue {
    const from = this.state;
    const fd = super.setMigDeviceState(state);
    if (fd !== -1 && fd.direction === 'save') this.#savingFd = fd;
    const fromPrecopy = from === MigState.PRE_COPY || from === MigState.PRE_COPY_P2P;
    return fromPrecopy && state === MigState.STOP_COPY ? this.#savingFd : fd;
  }
}

/** Lets STOP_COPY -> PRE_COPY(_P2P) through (by way of STOP and RUNNING), the pre-2026 loop's cell. */
class StopCopyToPreCopy extends VfioDevice {
  override setMigDeviceState(state: number): DataFdValue {
    if (
      this.state === MigState.STOP_COPY &&
      (state === MigState.PRE_COPY || state === MigState.PRE_COPY_P2P)
    ) {
      super.setMigDeviceState(MigState.RUNNING);
    }
    return super.setMigDeviceState(state);
  }
}

/**
 * Remembers the fd of the last session it opened and, on RESUMING -> RUNNING (whose path opens
 * none), hands back the resume fd of the session the load just ended: a stale, dead fd.
 */
class StaleFdAfterLoad extends VfioDevice {
  #resumeFd: DataFdValue = -1;
  override setMigDeviceState(state: number): DataFdValue {
    const from = this.state;
    const fd = super.setMigDeviceState(state);
    if (fd !== -1 && fd.direction === 'resume') this.#resumeFd = fd;
    return from === MigState.RESUMING && state === MigState.RUNNING ? this.#resumeFd : fd;
  }
}

export interface BrokenDevice {
  readonly factory: SampleDeviceFactory<LedgerOptions>;
  /** The checks that must fail, as `category/name`. */
  readonly caughtBy: readonly string[];
}

const broken = (
  type: string,
  description: string,
  options: LedgerOptions,
  caughtBy: string[],
): BrokenDevice => ({
  factory: ledgerFactory(type, description, options),
  caughtBy,
});

export const brokenDevices: readonly BrokenDevice[] = [
  broken(
    'ledger-accepts-truncated',
    'load accepts a stream without its END record',
    { flaws: { acceptsTruncated: true } },
    [
      'loading/truncated stream: 0 bytes',
      'loading/truncated stream: half',
      'loading/truncated stream: all but the last byte',
    ],
  ),
  broken(
    'ledger-stop-copy-enomsg',
    'STOP_COPY end of data reads ENOMSG',
    { flaws: { stopCopyEnomsg: true } },
    ['streams/STOP_COPY reads 0 forever at the end', 'round-trip/STOP -> STOP_COPY, no precopy'],
  ),
  broken(
    'ledger-ignores-checksum',
    'load does not verify record checksums',
    { flaws: { ignoresChecksum: true } },
    ['loading/flipped byte: middle byte', 'loading/flipped byte: last byte'],
  ),
  broken(
    'ledger-no-dirty-tracking',
    'pages written during PRE_COPY are never resent',
    { flaws: { noDirtyTracking: true } },
    ['precopy/dirty_bytes grows with work()', 'round-trip/PRE_COPY with work() between reads -> STOP_COPY'],
  ),
  broken(
    'ledger-works-while-stopped',
    'work() changes state in STOP',
    { flaws: { worksWhileStopped: true } },
    ['features/work() does nothing in STOP', 'features/work() does nothing in STOP_COPY'],
  ),
  broken(
    'ledger-fd-on-stop-copy-arc',
    'returns a data fd on PRE_COPY -> STOP_COPY',
    { vfioClass: FdOnStopCopyArc },
    ['transitions/PRE_COPY -> STOP_COPY', 'transitions/PRE_COPY_P2P -> STOP_COPY'],
  ),
  broken(
    'ledger-stale-fd-after-load',
    'returns the ended resume fd on RESUMING -> RUNNING',
    { vfioClass: StaleFdAfterLoad },
    ['transitions/RESUMING -> RUNNING'],
  ),
  broken(
    'ledger-stop-copy-to-pre-copy',
    'allows STOP_COPY -> PRE_COPY',
    { vfioClass: StopCopyToPreCopy, migrationFlags: MigFeature.STOP_COPY | MigFeature.PRE_COPY },
    ['transitions/STOP_COPY -> PRE_COPY'],
  ),
];
