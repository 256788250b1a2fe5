import { brokenDevices } from './broken-devices.js';
import { ledgerFactory, ledgerReference } from './ledger-device.js';

/**
 * Device factories for `softvfio conform --module dist/test/devices/conformance/fixtures.js`: the
 * reference ledger, a second correct type (the foreign one for cross-type loads) and the broken
 * variants. The CLI picks up every factory a module exports.
 */
export const ledgerSmall = ledgerFactory(
  'ledger-small',
  'ledger with 16 pages of 32 bytes, STOP_COPY|PRE_COPY',
  {
    pageCount: 16,
    pageBytes: 32,
    migrationFlags: 1 | 4,
    badLoad: 'error',
  },
);

export const factories = [ledgerReference, ledgerSmall, ...brokenDevices.map((b) => b.factory)];
