// The handshake: describeVm, configDifferences (every difference in words) and parseHello's
// checks of a HELLO (schema, magic, version, strictness, size limits).
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { Machine } from '../../../src/vmm/machine/machine.js';
import {
  configDifferences,
  describeVm,
  MAX_CHANNELS,
  parseHello,
  PROTOCOL_MAGIC,
  PROTOCOL_VERSION,
  type VmMigrationConfig,
} from '../../../src/vmm/migration/handshake.js';
import { MigrationError, MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';

const MiB = 1024 * 1024;

function config(): VmMigrationConfig {
  return {
    pageSizeBytes: 4096,
    vcpus: 2,
    ram: [
      { name: 'pc.ram', gpa: '0', sizeBytes: 64 * MiB, discardBlockBytes: null },
      { name: 'mem0', gpa: '4294967296', sizeBytes: 16 * MiB, discardBlockBytes: 2 * MiB },
    ],
    devices: [
      { name: 'nic0', type: 'nic', version: 1, fingerprint: '0123456789abcdef', migrationFlags: 0xf },
      { name: 'basic0', type: 'basic', version: 1, fingerprint: 'ab', migrationFlags: 0x1 },
    ],
  };
}

const SESSION = '6f1c2b9e-3c1d-4b7a-9e5f-0a1b2c3d4e5f';

function mainHello(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    magic: PROTOCOL_MAGIC,
    version: PROTOCOL_VERSION,
    session: SESSION,
    kind: 'main',
    vm: 'vm1',
    channels: 2,
    switchoverAck: true,
    config: config(),
    ...overrides,
  };
}

function channelHello(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    magic: PROTOCOL_MAGIC,
    version: PROTOCOL_VERSION,
    session: SESSION,
    kind: 'multifd',
    channel: 1,
    ...overrides,
  };
}

function refused(pattern: RegExp, code: string = MigrationErrorCode.PROTOCOL) {
  return (err: unknown) => {
    assert.ok(err instanceof MigrationError, String(err));
    assert.equal(err.code, code);
    assert.equal(err.phase, 'handshake');
    assert.match(err.message, pattern);
    return true;
  };
}

describe('configDifferences', () => {
  test('equal configurations: none', () => {
    assert.deepEqual(configDifferences(config(), config()), []);
  });

  test('page size, vCPUs, RAM size, gpa, discard block size, missing and extra blocks', () => {
    const s = config();
    s.pageSizeBytes = 65536;
    s.vcpus = 4;
    s.ram[0]!.sizeBytes = 32 * MiB;
    s.ram[1]!.gpa = '8589934592';
    assert.deepEqual(configDifferences(s, config()), [
      'page size 65536 vs 4096',
      '4 vCPUs vs 2',
      'RAM block 0: pc.ram at 0, 33554432 bytes vs pc.ram at 0, 67108864 bytes',
      'RAM block 1: mem0 at 8589934592, 16777216 bytes, discard blocks of 2097152 vs ' +
        'mem0 at 4294967296, 16777216 bytes, discard blocks of 2097152',
    ]);
    const d = config();
    d.ram[1]!.discardBlockBytes = 4 * MiB;
    assert.deepEqual(configDifferences(config(), d), [
      'RAM block 1: mem0 at 4294967296, 16777216 bytes, discard blocks of 2097152 vs ' +
        'mem0 at 4294967296, 16777216 bytes, discard blocks of 4194304',
    ]);
    const plain = config();
    plain.ram[1]!.discardBlockBytes = null;
    assert.match(
      configDifferences(plain, config())[0]!,
      /^RAM block 1: mem0 at 4294967296, 16777216 bytes vs .*discard/,
    );
    const renamed = config();
    renamed.ram[0]!.name = 'ram0';
    assert.match(configDifferences(renamed, config())[0]!, /^RAM block 0: ram0 at 0/);
    const fewer = config();
    fewer.ram.pop();
    assert.deepEqual(configDifferences(fewer, config()), [
      'RAM block 1: none vs mem0 at 4294967296, 16777216 bytes, discard blocks of 2097152',
    ]);
    assert.deepEqual(configDifferences(config(), fewer), [
      'RAM block 1: mem0 at 4294967296, 16777216 bytes, discard blocks of 2097152 vs none',
    ]);
  });

  test('device name, type, state version, configuration fingerprint, migration flags, count', () => {
    const s = config();
    s.devices[0]!.name = 'nic1';
    s.devices[1]!.type = 'accel';
    assert.deepEqual(configDifferences(s, config()), [
      'device 0: nic1 vs nic0',
      'device basic0: type accel vs basic',
    ]);
    const v = config();
    v.devices[0]!.version = 2;
    v.devices[0]!.fingerprint = 'fedcba';
    v.devices[0]!.migrationFlags = 0x5;
    assert.deepEqual(configDifferences(v, config()), [
      'device nic0: state version 2 vs 1',
      'device nic0: configuration fedcba vs 0123456789abcdef',
      'device nic0: migration features 0x5 vs 0xf',
    ]);
    const fewer = config();
    fewer.devices.pop();
    assert.deepEqual(configDifferences(fewer, config()), ['device 1: none vs basic0']);
    assert.deepEqual(configDifferences(config(), fewer), ['device 1: basic0 vs none']);
    // a different order is a difference: devices are numbered by position on the wire
    const swapped = config();
    swapped.devices.reverse();
    assert.deepEqual(configDifferences(swapped, config()), [
      'device 0: basic0 vs nic0',
      'device 1: nic0 vs basic0',
    ]);
  });
});

describe('describeVm', () => {
  const live: Machine[] = [];
  after(async () => {
    await Promise.all(live.map((vm) => vm.destroy()));
  });

  test('describes RAM blocks and devices as the handshake carries them; equal definitions agree', () => {
    const def = (name: string, seed: number) =>
      ({
        name,
        iommu: 'iommufd',
        ram: [
          { name: 'pc.ram', sizeBytes: 16 * MiB },
          { name: 'mem0', sizeBytes: 8 * MiB, discard: { blockSizeBytes: 2 * MiB } },
        ],
        vcpus: { count: 1 },
        devices: [
          { type: 'basic', name: 'basic0', seed },
          { type: 'accel', name: 'accel0', memoryBytes: MiB, seed },
        ],
      }) as const;
    const a = Machine.create(new Host(), def('a', 1));
    const b = Machine.create(new Host(), def('b', 2));
    live.push(a, b);
    const c = describeVm(a);
    assert.equal(c.pageSizeBytes, 4096);
    assert.equal(c.vcpus, 1);
    assert.deepEqual(
      c.ram.map((r) => [r.name, r.sizeBytes, r.discardBlockBytes]),
      [
        ['pc.ram', 16 * MiB, null],
        ['mem0', 8 * MiB, 2 * MiB],
      ],
    );
    assert.equal(c.ram[0]!.gpa, '0');
    assert.match(c.ram[1]!.gpa, /^\d+$/);
    assert.deepEqual(
      c.devices.map((d) => [d.name, d.type]),
      [
        ['basic0', 'basic'],
        ['accel0', 'accel'],
      ],
    );
    for (const d of c.devices) {
      assert.match(d.fingerprint, /^[0-9a-f]{1,16}$/);
      assert.ok(d.version >= 1 && d.migrationFlags > 0);
    }
    // the same definition (other names, seeds) is compatible; the config passes parseHello
    assert.deepEqual(configDifferences(c, describeVm(b)), []);
    assert.deepEqual(parseHello(mainHello({ config: c })).kind, 'main');

    const other = Machine.create(new Host(), {
      ...def('c', 3),
      devices: [
        { type: 'basic', name: 'basic0', seed: 1 },
        { type: 'accel', name: 'accel0', memoryBytes: 2 * MiB, seed: 1 },
      ],
    });
    live.push(other);
    const differences = configDifferences(c, describeVm(other));
    assert.equal(differences.length, 1);
    assert.match(differences[0]!, /^device accel0: configuration [0-9a-f]+ vs [0-9a-f]+$/);
  });
});

describe('parseHello', () => {
  test('accepts a main and a multifd HELLO', () => {
    const main = parseHello(mainHello());
    assert.equal(main.kind, 'main');
    assert.deepEqual(main, mainHello());
    assert.deepEqual(
      parseHello(channelHello({ channel: MAX_CHANNELS })),
      channelHello({ channel: MAX_CHANNELS }),
    );
    assert.equal(MAX_CHANNELS, 255);
    assert.equal(parseHello(mainHello({ channels: 0 })).kind, 'main');
  });

  test('refuses another magic, and what is not a HELLO at all', () => {
    assert.throws(() => parseHello(mainHello({ magic: 'qemu' })), refused(/^handshake: bad HELLO: magic: /));
    assert.throws(() => parseHello(channelHello({ magic: 0x11223344 })), refused(/bad HELLO: magic/));
    assert.throws(() => parseHello(null), refused(/bad HELLO: \(root\)/));
    assert.throws(() => parseHello([]), refused(/bad HELLO/));
    assert.throws(() => parseHello('HELLO'), refused(/bad HELLO/));
    assert.throws(() => parseHello(mainHello({ kind: 'postcopy' })), refused(/bad HELLO: kind/));
    assert.throws(() => parseHello(mainHello({ version: 1.5 })), refused(/bad HELLO: version/));
  });

  test('another protocol version is ERR_MIGRATION_INCOMPATIBLE, whatever else the HELLO carries', () => {
    const incompatible = refused(
      /^handshake: protocol version 2 is not supported \(this side speaks 1\)$/,
      MigrationErrorCode.INCOMPATIBLE,
    );
    assert.throws(() => parseHello(mainHello({ version: 2 })), incompatible);
    assert.throws(() => parseHello(channelHello({ version: 2 })), incompatible);
    // a later version may well add fields or change them: still the version is the reason
    assert.throws(() => parseHello(mainHello({ version: 2, compression: 'zstd' })), incompatible);
    assert.throws(() => parseHello(mainHello({ version: 2, config: { layout: 'v2' } })), incompatible);
    assert.throws(
      () => parseHello(mainHello({ version: 0 })),
      refused(/protocol version 0 is not supported/, MigrationErrorCode.INCOMPATIBLE),
    );
  });

  test('refuses extra keys anywhere, and missing ones', () => {
    assert.throws(() => parseHello(mainHello({ extra: 1 })), refused(/bad HELLO: \(root\): .*extra/));
    assert.throws(
      () => parseHello(channelHello({ config: config() })),
      refused(/bad HELLO: \(root\): .*config/),
    );
    const c = config() as unknown as { ram: Record<string, unknown>[]; devices: Record<string, unknown>[] };
    c.ram[0]!.hugepages = true;
    assert.throws(
      () => parseHello(mainHello({ config: c })),
      refused(/bad HELLO: config\.ram\.0: .*hugepages/),
    );
    const d = config() as unknown as { devices: Record<string, unknown>[] };
    delete d.devices[1]!.fingerprint;
    assert.throws(
      () => parseHello(mainHello({ config: d })),
      refused(/bad HELLO: config\.devices\.1\.fingerprint/),
    );
    const { session: _session, ...noSession } = mainHello();
    assert.throws(() => parseHello(noSession), refused(/bad HELLO: session/));
  });

  test('refuses oversize strings and counts', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [mainHello({ vm: 'v'.repeat(256) }), /bad HELLO: vm: /],
      [mainHello({ vm: '' }), /bad HELLO: vm: /],
      [mainHello({ session: 'a'.repeat(65) }), /bad HELLO: session: /],
      [mainHello({ session: 'ABCDEF0123' }), /bad HELLO: session: /],
      [mainHello({ session: 'abc' }), /bad HELLO: session: /],
      [mainHello({ channels: MAX_CHANNELS + 1 }), /bad HELLO: channels: /],
      [mainHello({ channels: -1 }), /bad HELLO: channels: /],
      [channelHello({ channel: 0 }), /bad HELLO: channel: /],
      [channelHello({ channel: 256 }), /bad HELLO: channel: /],
      [mainHello({ switchoverAck: 'yes' }), /bad HELLO: switchoverAck: /],
    ];
    const withConfig = (edit: (c: VmMigrationConfig) => void) => {
      const c = config();
      edit(c);
      return mainHello({ config: c });
    };
    cases.push(
      [withConfig((c) => (c.devices[0]!.type = 't'.repeat(65))), /bad HELLO: config\.devices\.0\.type: /],
      [withConfig((c) => (c.devices[0]!.name = 'n'.repeat(256))), /bad HELLO: config\.devices\.0\.name: /],
      [withConfig((c) => (c.devices[0]!.fingerprint = '0'.repeat(17))), /config\.devices\.0\.fingerprint: /],
      [withConfig((c) => (c.devices[0]!.fingerprint = 'XYZ')), /config\.devices\.0\.fingerprint: /],
      [withConfig((c) => (c.ram[0]!.gpa = '1'.repeat(21))), /bad HELLO: config\.ram\.0\.gpa: /],
      [withConfig((c) => (c.ram[0]!.gpa = '-1')), /config\.ram\.0\.gpa: /],
      [withConfig((c) => (c.ram[0]!.sizeBytes = 2 ** 53)), /config\.ram\.0\.sizeBytes: /],
      [withConfig((c) => (c.ram[0]!.sizeBytes = -4096)), /config\.ram\.0\.sizeBytes: /],
      [withConfig((c) => (c.vcpus = 1.5)), /bad HELLO: config\.vcpus: /],
      [withConfig((c) => (c.ram = Array.from({ length: 257 }, () => c.ram[0]!))), /bad HELLO: config\.ram: /],
      [
        withConfig((c) => (c.devices = Array.from({ length: 257 }, () => c.devices[0]!))),
        /bad HELLO: config\.devices: /,
      ],
    );
    for (const [hello, pattern] of cases) assert.throws(() => parseHello(hello), refused(pattern));
    // the limits themselves are fine
    assert.equal(parseHello(mainHello({ vm: 'v'.repeat(255), session: 'a'.repeat(64) })).kind, 'main');
  });
});
