// Migration URIs as QEMU writes them: tcp:HOST:PORT.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { formatMigrationUri, parseMigrationUri } from '../../../src/vmm/migration/migration-uri.js';

function invalid(pattern: RegExp) {
  return (err: unknown) => {
    assert.equal((err as { code?: string }).code, 'ERR_INVALID_ARGUMENT');
    assert.match((err as Error).message, pattern);
    return true;
  };
}

describe('migration URIs', () => {
  test('tcp:HOST:PORT with a name or an IPv4 address', () => {
    assert.deepEqual(parseMigrationUri('tcp:127.0.0.1:4444'), { host: '127.0.0.1', port: 4444 });
    assert.deepEqual(parseMigrationUri('tcp:dest-host.example.com:1'), {
      host: 'dest-host.example.com',
      port: 1,
    });
    assert.deepEqual(parseMigrationUri('tcp:localhost:65535'), { host: 'localhost', port: 65535 });
    assert.deepEqual(parseMigrationUri('tcp:h:00080'), { host: 'h', port: 80 });
    const longest = 'a'.repeat(253);
    assert.deepEqual(parseMigrationUri(`tcp:${longest}:9`), { host: longest, port: 9 });
  });

  test('port 0 only where a port is to be picked (a listening destination)', () => {
    assert.throws(() => parseMigrationUri('tcp:127.0.0.1:0'), invalid(/with a port from 1 to 65535/));
    assert.deepEqual(parseMigrationUri('tcp:127.0.0.1:0', { allowPortZero: true }), {
      host: '127.0.0.1',
      port: 0,
    });
    assert.throws(
      () => parseMigrationUri('tcp:127.0.0.1:65536', { allowPortZero: true }),
      invalid(/"tcp:127\.0\.0\.1:65536" is not tcp:HOST:PORT with a port from 0 to 65535/),
    );
  });

  test('anything else is refused, the URI quoted', () => {
    for (const uri of [
      '',
      'tcp:',
      'tcp:host',
      'tcp::4444',
      'tcp:host:',
      'tcp:host:-1',
      'tcp:host:123456',
      'tcp:host:99999',
      'tcp:[::1]:4444',
      'tcp:host name:4444',
      'tcp:host:4444/x',
      ' tcp:host:4444',
      'TCP:host:4444',
      'unix:/tmp/sock',
      'exec:cat',
      'rdma:host:4444',
      'tcp:host:4444:5555',
      `tcp:${'a'.repeat(254)}:4444`,
    ]) {
      assert.throws(
        () => parseMigrationUri(uri),
        invalid(
          new RegExp(
            `^migration URI ${JSON.stringify(uri).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is not tcp:HOST:PORT`,
          ),
        ),
        uri,
      );
    }
  });

  test('formatMigrationUri is the inverse', () => {
    const address = { host: '10.0.0.2', port: 49152 };
    assert.equal(formatMigrationUri(address), 'tcp:10.0.0.2:49152');
    assert.deepEqual(parseMigrationUri(formatMigrationUri(address)), address);
  });
});
