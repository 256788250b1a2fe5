import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControlClient, ControlError } from '../../../src/vmm/host/control-client.js';
import { ControlServer } from '../../../src/vmm/host/control-server.js';
import { runSoftwareHost, type RunningSoftwareHost } from '../../../src/vmm/host/host-process.js';
import { type ListenAddress, unixAddress } from '../../../src/vmm/host/listen-address.js';
import { SoftwareHost } from '../../../src/vmm/host/software-host.js';

const MiB = 2 ** 20;
const dir = mkdtempSync(join(tmpdir(), 'softvfio-ctl-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A small VM: 64 MiB, one vCPU dirtying it, a nic and a basic device. */
function small(name: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name,
    iommu: 'iommufd',
    ram: [{ name: 'pc.ram', sizeBytes: '64MiB' }],
    vcpus: { count: 1, workload: { dirtyRateMiBps: 16, seed: 1 } },
    devices: [
      { type: 'nic', name: 'nic0', flowTableBytes: '64KiB', rxRing: { entries: 16, bufferBytes: 2048 } },
      { type: 'basic', name: 'basic0' },
    ],
    guestDriverIntervalMs: 5,
    ...extra,
  };
}

interface Raw {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  json: unknown;
}

/** One raw HTTP request on the socket, headers and body as given. */
function raw(
  address: ListenAddress,
  method: string,
  path: string,
  options: { headers?: Record<string, string | number>; body?: string | Buffer; chunks?: Buffer[] } = {},
): Promise<Raw> {
  const target =
    address.kind === 'unix' ? { socketPath: address.path } : { host: address.host, port: address.port };
  return new Promise((resolve, reject) => {
    const req = request({ ...target, method, path, headers: options.headers ?? {}, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode!, headers: res.headers, json: text ? JSON.parse(text) : undefined });
      });
    });
    req.on('error', reject);
    if (options.chunks) {
      for (const c of options.chunks) req.write(c);
      req.end();
    } else req.end(options.body);
  });
}

const json = (body: unknown) => ({
  headers: { 'Content-Type': 'application/json' },
  body: JSON.stringify(body),
});

function errorOf(r: Raw): {
  code: string;
  message: string;
  errno?: string;
  details?: Record<string, unknown>;
} {
  return (r.json as { error: { code: string; message: string } }).error;
}

describe('the control server on a UNIX socket', () => {
  let running: RunningSoftwareHost;
  let address: ListenAddress;
  let client: ControlClient;

  before(async () => {
    running = await runSoftwareHost({ name: 'ctl', address: unixAddress(join(dir, 'ctl.sock')) });
    address = running.address;
    client = new ControlClient(address);
  });
  after(async () => {
    await running.shutdown();
  });

  test('GET /host, and the socket is 0600', async () => {
    const info = await client.hostInfo();
    assert.equal(info.name, 'ctl');
    assert.equal(info.pid, process.pid);
    assert.equal(info.vms, 0);
    assert.equal(info.kernel.dmaEntryLimit, 65535);
    assert.equal(lstatSync(join(dir, 'ctl.sock')).mode & 0o777, 0o600);
  });

  test('two VMs: create, list, status, start, digest moves, stop, digest stable, destroy', async () => {
    const a = await client.createVm(small('a'));
    assert.equal(a.state, 'created');
    assert.equal(a.ram.totalBytes, 64 * MiB);
    assert.equal(a.memlockLimitBytes, String(64n * BigInt(MiB) + (1n << 30n)), 'bigint as a decimal string');
    assert.equal(a.ram.blocks[0]!.gpa, '0');
    await client.createVm(small('b', { iommu: 'type1' }));
    assert.deepEqual(
      (await client.listVms()).map((v) => [v.name, v.state, v.iommu, v.devices.join(' ')]),
      [
        ['a', 'created', 'iommufd', 'nic0:nic basic0:basic'],
        ['b', 'created', 'type1', 'nic0:nic basic0:basic'],
      ],
    );

    const started = await client.startVm('a');
    assert.equal(started.state, 'running');
    assert.equal(started.ram.mappedBytes, 64 * MiB);
    assert.equal(started.lockedPages, (64 * MiB) / 4096);
    await client.startVm('b');
    const d1 = await client.vmDigest('a');
    await sleep(100);
    const d2 = await client.vmDigest('a');
    assert.equal(d1.state, 'running');
    assert.notEqual(d1.digest, d2.digest, 'the digest moves while the VM runs');
    assert.ok(d2.bytesDirtied > d1.bytesDirtied);

    const stopped = await client.stopVm('a');
    assert.equal(stopped.state, 'stopped');
    assert.deepEqual(
      stopped.devices.map((d) => [d.name, d.migrationState]),
      [
        ['nic0', 'RUNNING'],
        ['basic0', 'RUNNING'],
      ],
    );
    const s1 = await client.vmDigest('a');
    await sleep(50);
    assert.equal((await client.vmDigest('a')).digest, s1.digest, 'stable when stopped');
    assert.equal((await client.stopVm('a')).state, 'stopped', 'stopping a stopped VM is a no-op');
    assert.equal((await client.vmStatus('b')).state, 'running', 'the other VM runs on');

    await client.destroyVm('a');
    await assert.rejects(client.vmStatus('a'), { code: 'ERR_VM_NOT_FOUND', httpStatus: 404 });
    await client.destroyVm('b');
    assert.deepEqual(await client.listVms(), []);
    assert.equal(running.host.usedMemoryBytes, 0);
  });

  test('wrong state and names taken: 409', async () => {
    await client.createVm(small('w'));
    await assert.rejects(client.createVm(small('w')), (err: unknown) => {
      assert.ok(err instanceof ControlError);
      assert.equal(err.httpStatus, 409);
      assert.equal(err.code, 'ERR_VM_EXISTS');
      return true;
    });
    await assert.rejects(client.stopVm('w'), {
      httpStatus: 409,
      code: 'ERR_VM_STATE',
      message: /VM w is created, cannot stop it/,
    });
    await client.startVm('w');
    await assert.rejects(client.startVm('w'), {
      httpStatus: 409,
      message: /VM w is running, cannot start it/,
    });
    // Two starts sent at once run in turn: one resumes the VM, the other finds it running.
    await client.stopVm('w');
    const both = await Promise.allSettled([client.startVm('w'), client.startVm('w')]);
    assert.deepEqual(
      both
        .map((r) => (r.status === 'fulfilled' ? r.value.state : (r.reason as ControlError).httpStatus))
        .sort(),
      [409, 'running'],
    );
    await client.destroyVm('w');
  });

  test('a VM the kernel refuses: 422 with the mapping estimate and the limit', async () => {
    await client.createVm({
      name: 'vmem',
      iommu: 'type1',
      ram: [
        { name: 'pc.ram', sizeBytes: '64MiB' },
        { name: 'vmem0', sizeBytes: '512MiB', gpa: '4GiB', discard: { blockSizeBytes: '4KiB' } },
      ],
      vcpus: { count: 1 },
      devices: [{ type: 'basic', name: 'basic0' }],
    });
    const r = await raw(address, 'POST', '/vms/vmem/start');
    assert.equal(r.status, 422);
    const error = errorOf(r);
    assert.equal(error.code, 'ERR_DMA_MAPPING_LIMIT');
    assert.deepEqual(error.details, {
      estimate: { mappings: 131583, discardBlocks: 131072, discardSections: 1, maxMemslots: 512 },
      limit: 65535,
      limitReported: true,
    });
    assert.match(error.message, /block size.*dma_entry_limit.*iommufd/);
    const status = await client.vmStatus('vmem');
    assert.equal(status.state, 'failed');
    assert.equal(status.error?.code, 'ERR_DMA_MAPPING_LIMIT');
    assert.equal(status.ram.mappings, 0, 'nothing stays mapped');
    await assert.rejects(client.startVm('vmem'), { httpStatus: 409, message: /failed.*destroy it/ });
    await client.destroyVm('vmem');
  });

  test('a VM its memlock limit cannot cover: 422 naming the accounting mode and the limit', async () => {
    await client.createVm(small('locked', { memlockLimitBytes: '16MiB', accounting: 'mm', uid: 4242 }));
    await assert.rejects(client.startVm('locked'), (err: unknown) => {
      assert.ok(err instanceof ControlError);
      assert.equal(err.httpStatus, 422);
      assert.equal(err.code, 'ERR_GUEST_RAM_PIN');
      assert.equal(err.errno, undefined);
      assert.match(err.message, /accounting mode 'mm'.*RLIMIT_MEMLOCK 16 MiB/);
      assert.deepEqual(err.details?.limit, { kind: 'RLIMIT_MEMLOCK', bytes: String(16 * MiB) });
      assert.equal(err.details?.accountingMode, 'mm');
      assert.equal(err.details?.memlockLimitBytes, String(16 * MiB));
      assert.deepEqual(err.details?.section, {
        ramBlock: 'pc.ram',
        iova: '0',
        lengthBytes: String(64 * MiB),
      });
      return true;
    });
    await client.destroyVm('locked');
  });

  test('bad input: JSON, size, content type, schema, names, routes, methods, query, origin', async () => {
    const cases: [Raw, number, string][] = [
      [
        await raw(address, 'POST', '/vms', {
          headers: { 'Content-Type': 'application/json' },
          body: '{"name": ',
        }),
        400,
        'ERR_BAD_JSON',
      ],
      [
        await raw(address, 'POST', '/vms', {
          headers: { 'Content-Type': 'application/json' },
          body: Buffer.from([0x7b, 0xff, 0x7d]),
        }),
        400,
        'ERR_BAD_JSON',
      ],
      [
        await raw(address, 'POST', '/vms', { headers: { 'Content-Type': 'text/plain' }, body: '{}' }),
        415,
        'ERR_UNSUPPORTED_MEDIA_TYPE',
      ],
      [await raw(address, 'POST', '/vms'), 400, 'ERR_BAD_REQUEST'],
      [await raw(address, 'POST', '/vms', json({ name: 'x' })), 400, 'ERR_VM_DEFINITION'],
      [await raw(address, 'GET', '/vms/nope'), 404, 'ERR_VM_NOT_FOUND'],
      [await raw(address, 'POST', '/vms/nope/start'), 404, 'ERR_VM_NOT_FOUND'],
      [await raw(address, 'GET', '/vms/nope/digest'), 404, 'ERR_VM_NOT_FOUND'],
      [await raw(address, 'DELETE', '/vms/nope'), 404, 'ERR_VM_NOT_FOUND'],
      [await raw(address, 'GET', '/vms/..%2Fetc'), 400, 'ERR_BAD_REQUEST'],
      [await raw(address, 'GET', '/vms/%E0%A4%A'), 400, 'ERR_BAD_REQUEST'],
      [await raw(address, 'GET', '/vms?all=1'), 400, 'ERR_BAD_REQUEST'],
      [await raw(address, 'GET', '/nothing'), 404, 'ERR_NO_ROUTE'],
      [await raw(address, 'GET', '/vms/a/b/c'), 404, 'ERR_NO_ROUTE'],
      [await raw(address, 'PUT', '/vms'), 405, 'ERR_METHOD_NOT_ALLOWED'],
      [await raw(address, 'POST', '/host', json({})), 405, 'ERR_METHOD_NOT_ALLOWED'],
      [await raw(address, 'POST', '/vms/a/start', json({ force: true })), 400, 'ERR_BAD_REQUEST'],
      [
        await raw(address, 'GET', '/host', { headers: { Origin: 'https://evil.example' } }),
        403,
        'ERR_FORBIDDEN',
      ],
    ];
    for (const [r, status, code] of cases) {
      assert.equal(r.status, status, JSON.stringify(r.json));
      assert.equal(errorOf(r).code, code, JSON.stringify(r.json));
      assert.equal(typeof errorOf(r).message, 'string');
    }
    assert.equal((await raw(address, 'PUT', '/vms')).headers.allow, 'GET, POST');
    const schema = errorOf(
      await raw(
        address,
        'POST',
        '/vms',
        json({ ...small('s'), ram: [{ name: 'pc.ram', sizeBytes: 'lots' }] }),
      ),
    );
    assert.deepEqual(schema.details, {
      issues: [
        {
          path: '$.ram[0].sizeBytes',
          message:
            '"lots" is not a byte count (a non-negative integer, or a string like "512MiB", "4KiB", "0x1000")',
        },
      ],
    });
    assert.equal((await raw(address, 'POST', '/vms/nope/start', json({}))).status, 404, '{} is no body');
    assert.deepEqual(await client.listVms(), [], 'nothing was created');
  });

  test('oversized bodies are refused before they are buffered: 413', async () => {
    const big = Buffer.alloc(2 * MiB, 0x20);
    const announced = await raw(address, 'POST', '/vms', {
      headers: { 'Content-Type': 'application/json', 'Content-Length': big.length },
      body: big,
    });
    assert.equal(announced.status, 413);
    assert.equal(errorOf(announced).code, 'ERR_BODY_TOO_LARGE');
    const chunked = await raw(address, 'POST', '/vms', {
      headers: { 'Content-Type': 'application/json' },
      chunks: [Buffer.from('['), ...Array.from({ length: 20 }, () => Buffer.alloc(64 * 1024, 0x20))],
    });
    assert.equal(chunked.status, 413);
    await assert.rejects(client.createVm({ pad: 'x'.repeat(2 * MiB) }), { code: 'ERR_BODY_TOO_LARGE' });
    assert.equal((await client.hostInfo()).vms, 0, 'the server still serves');
  });

  test('the host budget: VM count and memory, 507', async () => {
    const host = new SoftwareHost({ name: 'budget', maxVms: 1, maxMemoryBytes: 100 * MiB });
    const server = await ControlServer.listen(host, unixAddress(join(dir, 'budget.sock')));
    try {
      const c = new ControlClient(server.address);
      await assert.rejects(c.createVm(small('big', { ram: [{ name: 'pc.ram', sizeBytes: '128MiB' }] })), {
        httpStatus: 507,
        code: 'ERR_HOST_LIMIT',
        message: /needs \d+ bytes of memory/,
      });
      await c.createVm(small('one'));
      await assert.rejects(c.createVm(small('two')), { httpStatus: 507, message: /runs 1 VMs, its limit/ });
      await assert.rejects(c.shutdown(), { httpStatus: 404 }, 'no shutdown route without an owner');
    } finally {
      await server.close();
      await host.shutdown();
    }
    assert.throws(() => host.createFromJson(small('late')), { code: 'ERR_HOST_SHUTTING_DOWN' });
  });
});

describe('the socket path and shutdown', () => {
  test('a live host keeps its socket; a stale socket file is replaced; anything else is left alone', async () => {
    const path = join(dir, 'claim.sock');
    const first = await runSoftwareHost({ name: 'first', address: unixAddress(path) });
    await assert.rejects(runSoftwareHost({ name: 'second', address: unixAddress(path) }), {
      code: 'ERR_HOST_RUNNING',
      message: /already listening/,
    });
    await first.shutdown();
    assert.equal(existsSync(path), false, 'the socket file is removed');

    // A stale socket: its process died without cleaning up.
    assert.throws(
      () =>
        execFileSync(
          process.execPath,
          [
            '-e',
            `require('node:net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`,
          ],
          { stdio: 'ignore' },
        ),
      { signal: 'SIGKILL' },
    );
    assert.ok(lstatSync(path).isSocket(), 'a stale socket file is there');
    const again = await runSoftwareHost({ name: 'again', address: unixAddress(path) });
    assert.equal((await new ControlClient(again.address).hostInfo()).name, 'again');
    await again.shutdown();

    const file = join(dir, 'not-a-socket');
    writeFileSync(file, 'keep me');
    await assert.rejects(runSoftwareHost({ name: 'x', address: unixAddress(file) }), {
      code: 'ERR_BAD_ADDRESS',
    });
    assert.equal(readFileSync(file, 'utf8'), 'keep me');
    assert.throws(() => unixAddress(join(dir, 'x'.repeat(120))), {
      code: 'ERR_BAD_ADDRESS',
      message: /more than a UNIX socket takes/,
    });
  });

  test('POST /shutdown: 202, then every VM is stopped and destroyed and the socket removed', async () => {
    const path = join(dir, 'down.sock');
    const running = await runSoftwareHost({ name: 'down', address: unixAddress(path) });
    const c = new ControlClient(running.address);
    await c.createVm(small('r1'));
    await c.startVm('r1');
    await c.createVm(small('r2'));
    const machine = running.host.machine('r1');
    await c.shutdown();
    const report = await running.done;
    assert.deepEqual(report, { destroyed: ['r1', 'r2'], errors: [] });
    assert.equal(machine.state, 'destroyed');
    assert.equal(existsSync(path), false);
    await assert.rejects(c.hostInfo(), { code: 'ERR_NO_HOST' });
  });

  test('an AbortSignal shuts the host down', async () => {
    const abort = new AbortController();
    const running = await runSoftwareHost({
      name: 'sig',
      address: unixAddress(join(dir, 'sig.sock')),
      signal: abort.signal,
    });
    await new ControlClient(running.address).createVm(small('s1'));
    abort.abort();
    assert.deepEqual(await running.done, { destroyed: ['s1'], errors: [] });
  });

  test('loopback TCP: port 0 picks one; a foreign Host header is refused', async () => {
    const running = await runSoftwareHost({
      name: 'tcp',
      address: { kind: 'tcp', host: '127.0.0.1', port: 0 },
    });
    try {
      const address = running.address;
      assert.ok(address.kind === 'tcp' && address.port > 0);
      assert.equal((await new ControlClient(address).hostInfo()).name, 'tcp');
      const rebound = await raw(address, 'GET', '/host', { headers: { Host: 'attacker.example:80' } });
      assert.equal(rebound.status, 403);
      assert.equal(errorOf(rebound).code, 'ERR_FORBIDDEN');
    } finally {
      await running.shutdown();
    }
  });
});
