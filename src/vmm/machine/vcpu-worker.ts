/**
 * The vCPU worker script (a worker_threads entry point, loaded by VcpuSet as
 * `new URL('./vcpu-worker.js', import.meta.url)`): runs one vCPU until its set tells it to quit.
 */
import { isMainThread, workerData } from 'node:worker_threads';
import { runVcpu } from './vcpu-loop.js';
import type { VcpuWorkerData } from './vcpu-worker-data.js';

if (isMainThread) throw new Error('vcpu-worker.js runs in a worker thread only');
runVcpu(workerData as VcpuWorkerData);
