import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { VfioIommuInfo } from '../../../src/kernel/vfio/container-api.js';
import { VfioIommuInfoCapId } from '../../../src/uapi/vfio-type1.js';
import {
  ASSUMED_DMA_MAX_MAPPINGS,
  checkDmaMappingLimit,
  DEFAULT_MAX_MEMSLOTS,
  estimateDmaMappings,
  type1DmaMaxMappings,
} from '../../../src/vmm/machine/dma-mapping-estimate.js';
import { GuestRam } from '../../../src/vmm/machine/guest-ram.js';
import { DmaMappingLimitError } from '../../../src/vmm/machine/machine-errors.js';

const MiB = 1024 * 1024;

test("QEMU's estimate: blocks of discardable regions + memory slots - discardable regions", () => {
  const ram = new GuestRam();
  ram.addBlock({ name: 'pc.ram', sizeBytes: 4 * MiB, gpa: 0n });
  assert.equal(estimateDmaMappings(ram.blocks), undefined, 'no discardable region: no check');
  ram.addBlock({ name: 'vmem0', sizeBytes: 64 * MiB, gpa: 1n << 32n, discard: { blockSizeBytes: 4096 } });
  ram.addBlock({ name: 'vmem1', sizeBytes: 64 * MiB, gpa: 2n << 32n, discard: { blockSizeBytes: 2 * MiB } });
  assert.deepEqual(estimateDmaMappings(ram.blocks), {
    mappings: 16384 + 32 + DEFAULT_MAX_MEMSLOTS - 2,
    discardBlocks: 16384 + 32,
    discardSections: 2,
    maxMemslots: 512,
  });
  assert.equal(estimateDmaMappings(ram.blocks, 32764)!.mappings, 16416 + 32764 - 2);
});

test('the type1 limit is DMA_AVAIL, or 65535 when the capability is missing', () => {
  const info = (caps: VfioIommuInfo['caps']): VfioIommuInfo => ({ flags: 3, iovaPgsizes: 4096n, caps });
  assert.deepEqual(type1DmaMaxMappings(info([])), { limit: ASSUMED_DMA_MAX_MAPPINGS, reported: false });
  assert.deepEqual(
    type1DmaMaxMappings(info([{ id: VfioIommuInfoCapId.DMA_AVAIL, version: 1, avail: 1234 }])),
    { limit: 1234, reported: true },
  );
});

test('over the limit is a DmaMappingLimitError naming the numbers and the remedy; at the limit is fine', () => {
  const estimate = { mappings: 66047, discardBlocks: 65536, discardSections: 1, maxMemslots: 512 };
  checkDmaMappingLimit('vm', estimate, undefined);
  checkDmaMappingLimit('vm', { ...estimate, mappings: 65535 }, { limit: 65535, reported: false });
  assert.throws(
    () => checkDmaMappingLimit('vm', estimate, { limit: 65535, reported: false }),
    (err: unknown) => {
      assert.ok(err instanceof DmaMappingLimitError);
      assert.equal(err.code, 'ERR_DMA_MAPPING_LIMIT');
      assert.equal(err.limit, 65535);
      assert.equal(err.limitReported, false);
      assert.deepEqual(err.estimate, estimate);
      for (const part of [
        '66047',
        '65536 blocks',
        '512 memory slots',
        '65535',
        'not reported',
        'block size',
        'iommufd',
      ]) {
        assert.ok(err.message.includes(part), `${part} in: ${err.message}`);
      }
      return true;
    },
  );
});
