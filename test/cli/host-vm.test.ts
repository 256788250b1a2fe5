import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import type { VmDigestWire, VmInfoWire } from '../../src/vmm/host/control-protocol.js';

/** `softvfio host` and `softvfio vm …` as child processes, judged by exit code and output. */
const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
const EXAMPLE = fileURLToPath(new URL('../../../examples/vm-1g.json', import.meta.url));
const GiB = 2 ** 30;

const dir = mkdtempSync(join(tmpdir(), 'softvfio-cli-'));
const socket = join(dir, 'host.sock');
const children = new Set<ChildProcess>();

after(() => {
  for (const child of children)
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function softvfio(...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    const child = execFile(
      process.execPath,
      [MAIN, ...args],
      { maxBuffer: 16 << 20 },
      (error, stdout, stderr) => {
        children.delete(child);
        const code = error ? (error as { code?: unknown }).code : 0;
        assert.equal(typeof code, 'number', `softvfio did not run: ${String(error)}`);
        resolve({ code: code as number, stdout, stderr });
      },
    );
    children.add(child);
  });
}

const vm = (...args: string[]) => softvfio('vm', ...args, '--socket', socket);

interface HostProcess {
  child: ChildProcess;
  /** stdout lines, parsed. */
  events: Record<string, unknown>[];
  stderr: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Start `softvfio host --json` and wait for its 'listening' line. */
async function startHost(...args: string[]): Promise<HostProcess> {
  const child = spawn(process.execPath, [MAIN, 'host', '--json', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  const events: Record<string, unknown>[] = [];
  const stderr: string[] = [];
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  createInterface({ input: child.stderr! }).on('line', (line) => stderr.push(line));
  const listening = new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const event = JSON.parse(line) as Record<string, unknown>;
      events.push(event);
      if (event.event === 'listening') resolve();
    });
    void exited.then(({ code }) => reject(new Error(`host exited ${code}: ${stderr.join('\n')}`)));
    setTimeout(() => reject(new Error('the host did not start listening in 10 s')), 10_000).unref();
  });
  await listening;
  return { child, events, stderr, exited };
}

function definitionFile(name: string, definition: unknown): string {
  const path = join(dir, name);
  writeFileSync(path, typeof definition === 'string' ? definition : JSON.stringify(definition));
  return path;
}

describe('softvfio host and softvfio vm, end to end', () => {
  let host: HostProcess;

  before(async () => {
    host = await startHost('--name', 'e2e', '--socket', socket);
  });

  test('the host says where it listens', () => {
    assert.deepEqual(host.events[0], {
      event: 'listening',
      name: 'e2e',
      address: `unix:${socket}`,
      socket,
      pid: host.child.pid,
    });
  });

  test('a second host on the same socket is refused: exit 1', async () => {
    const second = await softvfio('host', '--name', 'other', '--socket', socket);
    assert.equal(second.code, 1, second.stderr);
    assert.match(second.stderr, /a host is already listening on/);
  });

  test('the 1 GiB example VM: create, start, its digest moves, stop, digest stable, status', async () => {
    const created = await vm('create', EXAMPLE, '--json');
    assert.equal(created.code, 0, created.stderr);
    assert.equal((JSON.parse(created.stdout) as VmInfoWire).state, 'created');

    const started = await vm('start', 'vm-1g');
    assert.equal(started.code, 0, started.stderr);
    assert.match(started.stdout, /started VM vm-1g/);
    assert.match(started.stdout, /│ state\s+│ running/);
    assert.match(started.stdout, /1 GiB, 1 GiB mapped in 1 mapping\(s\), 262,144 pages locked/);

    const d1 = await vm('digest', 'vm-1g', '--json');
    await sleep(300);
    const d2 = await vm('digest', 'vm-1g', '--json');
    assert.equal(d1.code, 0, d1.stderr);
    const [a, b] = [JSON.parse(d1.stdout) as VmDigestWire, JSON.parse(d2.stdout) as VmDigestWire];
    assert.equal(a.state, 'running');
    assert.match(a.digest, /^[0-9a-f]{64}$/);
    assert.notEqual(a.digest, b.digest, 'the digest changes while the VM runs');
    assert.ok(b.bytesDirtied > a.bytesDirtied);

    const stopped = await vm('stop', 'vm-1g');
    assert.equal(stopped.code, 0, stopped.stderr);
    const s1 = await vm('digest', 'vm-1g');
    await sleep(200);
    const s2 = await vm('digest', 'vm-1g');
    assert.match(s1.stdout, /^[0-9a-f]{64} {2}vm-1g \(stopped, /);
    assert.equal(s1.stdout, s2.stdout, 'stable when stopped');

    const status = await vm('status', 'vm-1g', '--json');
    assert.equal(status.code, 0, status.stderr);
    const info = JSON.parse(status.stdout) as VmInfoWire;
    assert.equal(info.state, 'stopped');
    assert.equal(info.iommu, 'iommufd');
    assert.equal(info.accounting, 'user');
    assert.equal(info.memlockLimitBytes, String(2 * GiB));
    assert.deepEqual(info.ram.blocks, [{ name: 'pc.ram', gpa: '0', sizeBytes: GiB, pluggedBytes: GiB }]);
    assert.equal(info.ram.mappedBytes, GiB);
    assert.equal(info.vcpus.count, 2);
    assert.ok(info.vcpus.bytesWritten > 0);
    assert.deepEqual(
      info.devices.map((d) => [d.name, d.type, d.migrationState]),
      [
        ['nic0', 'nic', 'RUNNING'],
        ['accel0', 'accel', 'RUNNING'],
        ['basic0', 'basic', 'RUNNING'],
      ],
    );
    assert.ok(info.bytesDirtied.deviceDma > 0, 'the nic and the accel wrote guest RAM');

    const table = await vm('status', 'vm-1g');
    assert.match(table.stdout, /│ nic0\s+│ nic\s+│ RUNNING/);
    assert.match(table.stdout, /│ pc\.ram\s+│ 0x0\s+│ 1 GiB/);
    const list = await vm('list');
    assert.match(
      list.stdout,
      /│ vm-1g\s+│ stopped\s+│ iommufd\s+│ user\s+│ 1 GiB\s+│ 2\s+│ nic0:nic accel0:accel basic0:basic/,
    );
  });

  test('the DMA mapping limit: vm start exits 1 with the numbers and the remedy', async () => {
    const file = definitionFile('vmem.json', {
      name: 'vmem',
      iommu: 'type1',
      ram: [
        { name: 'pc.ram', sizeBytes: '64MiB' },
        { name: 'vmem0', sizeBytes: '512MiB', gpa: '4GiB', discard: { blockSizeBytes: '4KiB' } },
      ],
      vcpus: { count: 1, workload: { dirtyRateMiBps: 8 } },
      devices: [
        { type: 'nic', name: 'nic0', flowTableBytes: '64KiB', rxRing: { entries: 16, bufferBytes: 2048 } },
      ],
    });
    assert.equal((await vm('create', file)).code, 0);
    const run = await vm('start', 'vmem');
    assert.equal(run.code, 1, run.stdout + run.stderr);
    assert.equal(run.stdout, '');
    for (const part of [
      /possibly running out of DMA mappings/,
      /DMA mappings needed: 131583 = 131072 blocks in 1 discardable region\(s\) \+ 512 memory slots - 1/,
      /type1 container limit: 65535 \(DMA_AVAIL\)/,
      /Increase the block size of the discardable region\(s\)/,
      /raise vfio_iommu_type1\.dma_entry_limit, or use the iommufd backend/,
    ]) {
      assert.match(run.stderr, part);
    }
    const json = await vm('start', 'vmem', '--json');
    assert.equal(json.code, 1);
    const { error } = JSON.parse(json.stdout) as {
      error: { code: string; details: Record<string, unknown> };
    };
    assert.equal(error.code, 'ERR_VM_STATE', 'a failed VM cannot be started again');
    const status = JSON.parse((await vm('status', 'vmem', '--json')).stdout) as VmInfoWire;
    assert.equal(status.state, 'failed');
    assert.equal(status.error?.code, 'ERR_DMA_MAPPING_LIMIT');
    assert.equal((await vm('destroy', 'vmem')).code, 0);
  });

  test('pin accounting: a memlock limit too small, vm start exits 1 naming the mode and the limit', async () => {
    const file = definitionFile('small.json', {
      name: 'tight',
      iommu: 'iommufd',
      accounting: 'user',
      uid: 3000,
      memlockLimitBytes: '64MiB',
      ram: [{ name: 'pc.ram', sizeBytes: '256MiB' }],
      vcpus: { count: 1 },
      devices: [{ type: 'basic', name: 'basic0' }],
    });
    assert.equal((await vm('create', file)).code, 0);
    const run = await vm('start', 'tight', '--json');
    assert.equal(run.code, 1, run.stderr);
    const { error } = JSON.parse(run.stdout) as {
      error: { code: string; message: string; details: Record<string, unknown> };
    };
    assert.equal(error.code, 'ERR_GUEST_RAM_PIN');
    assert.match(
      error.message,
      /accounting mode 'user' charges uid 3000's locked_vm; \d+ pages locked, against RLIMIT_MEMLOCK 64 MiB/,
    );
    assert.deepEqual(error.details.limit, { kind: 'RLIMIT_MEMLOCK', bytes: String(64 * 2 ** 20) });
    assert.equal(error.details.accountingMode, 'user');

    assert.equal((await vm('destroy', 'tight')).code, 0);
    assert.equal((await vm('create', file, '--name', 'tight2')).code, 0, '--name renames the file’s VM');
    const human = await vm('start', 'tight2');
    assert.equal(human.code, 1);
    assert.match(human.stderr, /accounting mode: user \(iommufd\)/);
    assert.match(human.stderr, /limit hit: RLIMIT_MEMLOCK 64 MiB/);
    assert.equal((await vm('destroy', 'tight2')).code, 0);
  });

  test('bad input is exit 2: schema violations with their paths, bad files, unknown VMs, no host', async () => {
    const schema = await vm(
      'create',
      definitionFile('bad.json', {
        name: 'bad',
        iommu: 'iommufd',
        ram: [{ name: 'pc.ram', sizeBytes: '1 GB' }],
        vcpus: { count: 0 },
      }),
    );
    assert.equal(schema.code, 2);
    assert.match(schema.stderr, /bad\.json: invalid VM definition \(2 issue\(s\)\)/);
    assert.match(schema.stderr, /\$\.ram\[0\]\.sizeBytes: "1 GB" is not a byte count/);
    assert.match(schema.stderr, /\$\.vcpus\.count: Too small/);
    const schemaJson = await vm('create', join(dir, 'bad.json'), '--json');
    assert.equal(schemaJson.code, 2);
    const issues = (JSON.parse(schemaJson.stdout) as { error: { details: { issues: { path: string }[] } } })
      .error.details.issues;
    assert.deepEqual(
      issues.map((i) => i.path),
      ['$.ram[0].sizeBytes', '$.vcpus.count'],
    );

    const notJson = await vm('create', definitionFile('broken.json', '{"name": "x",'));
    assert.equal(notJson.code, 2);
    assert.match(notJson.stderr, /broken\.json is not JSON/);
    const missing = await vm('create', join(dir, 'missing.json'));
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /cannot read .*missing\.json: ENOENT/);
    const huge = await vm('create', definitionFile('huge.json', ' '.repeat(2 ** 20 + 1)));
    assert.equal(huge.code, 2);
    assert.match(huge.stderr, /a VM definition is at most 1048576/);

    const unknown = await vm('status', 'nope');
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /no VM named nope on host e2e/);
    const badName = await vm('start', '../x');
    assert.equal(badName.code, 2);
    const noHost = await softvfio('vm', 'list', '--socket', join(dir, 'nobody.sock'));
    assert.equal(noHost.code, 2);
    assert.match(noHost.stderr, /no host is listening on unix:.*nobody\.sock/);
    const both = await softvfio('vm', 'list', '--socket', socket, '--host', 'e2e');
    assert.equal(both.code, 2);
    const badListen = await softvfio('host', '--listen', '0.0.0.0:80');
    assert.equal(badListen.code, 2);
    assert.match(badListen.stderr, /not a loopback address/);
  });

  test('a wrong state is exit 1', async () => {
    const run = await vm('stop', 'vm-1g');
    assert.equal(run.code, 0, 'stopping a stopped VM is fine');
    assert.equal((await vm('start', 'vm-1g')).code, 0, 'resumed');
    const again = await vm('start', 'vm-1g');
    assert.equal(again.code, 1);
    assert.match(again.stderr, /VM vm-1g is running, cannot start it/);
  });

  test('SIGTERM: the host stops and destroys its VMs, removes its socket and exits 0', async () => {
    host.child.kill('SIGTERM');
    const { code, signal } = await host.exited;
    assert.equal(signal, null);
    assert.equal(code, 0, host.stderr.join('\n'));
    assert.equal(existsSync(socket), false, 'the socket file is gone');
    assert.deepEqual(host.events.at(-1), { event: 'stopped', name: 'e2e', destroyed: ['vm-1g'], errors: [] });
    assert.ok(host.stderr.some((l) => /"signal":"SIGTERM"/.test(l)));
  });
});

describe('softvfio host on loopback TCP', () => {
  test('--listen 127.0.0.1:0 picks a port, vm --connect reaches it, SIGINT stops it with exit 0', async () => {
    const host = await startHost('--name', 'tcp', '--listen', '127.0.0.1:0');
    const listening = host.events[0]!;
    assert.equal(listening.host, '127.0.0.1');
    const port = listening.port as number;
    assert.ok(Number.isInteger(port) && port > 0);
    const list = await softvfio('vm', 'list', '--connect', `127.0.0.1:${port}`);
    assert.equal(list.code, 0, list.stderr);
    assert.equal(list.stdout, 'no VMs\n');
    const json = await softvfio('vm', 'list', '--connect', `localhost:${port}`, '--json');
    assert.deepEqual(JSON.parse(json.stdout), { vms: [] });
    host.child.kill('SIGINT');
    assert.deepEqual(await host.exited, { code: 0, signal: null });
    const gone = await softvfio('vm', 'list', '--connect', `127.0.0.1:${port}`);
    assert.equal(gone.code, 2);
    assert.match(gone.stderr, /no host is listening on tcp:127\.0\.0\.1:/);
  });
});
