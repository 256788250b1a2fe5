import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ControlClient, ControlError } from '../../../src/vmm/host/control-client.js';
import { unixAddress } from '../../../src/vmm/host/listen-address.js';

/** The client against a host that misbehaves: every answer is untrusted input. */
describe('the control client, against a misbehaving host', () => {
  const dir = mkdtempSync(join(tmpdir(), 'softvfio-client-'));
  const path = join(dir, 'fake.sock');
  let answer: (res: ServerResponse) => void = (res) => res.end('{}');
  let server: Server;
  const client = new ControlClient(unixAddress(path), { timeoutMs: 200 });

  before(async () => {
    server = createServer((_req, res) => answer(res));
    await new Promise<void>((resolve) => server.listen(path, resolve));
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    rmSync(dir, { recursive: true, force: true });
  });

  const reply = (status: number, body: string, headers: Record<string, string> = {}) => {
    answer = (res) => {
      res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
      res.end(body);
    };
  };

  test('a typed error comes back as ControlError with its status, code, errno and numbers', async () => {
    reply(
      422,
      JSON.stringify({ error: { code: 'ERR_X', message: 'no', errno: 'ENOMEM', details: { limit: 3 } } }),
    );
    await assert.rejects(client.startVm('a'), (err: unknown) => {
      assert.ok(err instanceof ControlError);
      assert.deepEqual(
        [err.httpStatus, err.code, err.errno, err.details],
        [422, 'ERR_X', 'ENOMEM', { limit: 3 }],
      );
      return true;
    });
    reply(400, JSON.stringify({ error: { code: 'ERR_Y', message: 'm', errno: 'EBOGUS' } }));
    await assert.rejects(
      client.vmStatus('a'),
      { code: 'ERR_Y', errno: undefined },
      'an unknown errno is dropped',
    );
  });

  test('answers that are not what the API promises: ERR_BAD_RESPONSE', async () => {
    for (const [status, body] of [
      [200, 'not json'],
      [200, JSON.stringify({ name: 'a' })],
      [200, JSON.stringify({ name: 'a', state: 'running', digest: 'zz', bytesDirtied: 1 })],
      [500, 'oops'],
      [404, JSON.stringify({ error: 'nope' })],
    ] as const) {
      reply(status, body);
      await assert.rejects(client.vmDigest('a'), { code: 'ERR_BAD_RESPONSE' }, body);
    }
    answer = (res) => {
      res.writeHead(200, { 'Content-Length': String(64 << 20) });
      res.write('{');
    };
    await assert.rejects(client.hostInfo(), { code: 'ERR_BAD_RESPONSE', message: /67108864-byte answer/ });
    answer = (res) => {
      res.writeHead(200);
      const chunk = Buffer.alloc(1 << 20, 0x20);
      for (let i = 0; i < 17; i++) res.write(chunk);
      res.end();
    };
    await assert.rejects(client.hostInfo(), {
      code: 'ERR_BAD_RESPONSE',
      message: /more than 16777216 bytes/,
    });
  });

  test('no answer in time: ERR_TIMEOUT; an aborted call rejects with the reason', async () => {
    answer = () => undefined;
    await assert.rejects(client.listVms(), { code: 'ERR_TIMEOUT' });
    const abort = new AbortController();
    const call = client.listVms({ signal: abort.signal });
    abort.abort(new Error('changed my mind'));
    await assert.rejects(call, { message: 'changed my mind' });
  });

  test('a body larger than the host takes is refused before it is sent', async () => {
    await assert.rejects(client.createVm({ pad: 'x'.repeat(1 << 20) }), { code: 'ERR_BODY_TOO_LARGE' });
  });

  test('nobody listening: ERR_NO_HOST', async () => {
    await assert.rejects(new ControlClient(unixAddress(join(dir, 'none.sock'))).hostInfo(), {
      code: 'ERR_NO_HOST',
      message: /no host is listening on unix:/,
    });
  });
});
