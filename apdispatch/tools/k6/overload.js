// Open-loop unary load on the AP's Dispatcher at a constant arrival rate, for
// `apdispatch bench --overload --load k6`. The driver passes everything in the
// environment and reads the summary this script writes to SUMMARY.
import grpc from 'k6/net/grpc';
import { Counter, Trend } from 'k6/metrics';

const AP = __ENV.AP;
const RATE = Number(__ENV.RATE);
const DURATION = __ENV.DURATION;
const DEADLINE_MS = Number(__ENV.DEADLINE_MS);
const PROTOS = __ENV.PROTOS;

export const options = {
  scenarios: {
    load: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Number(__ENV.VUS),
      maxVUs: Number(__ENV.VUS) * 4,
    },
  },
  summaryTrendStats: ['med', 'p(99)', 'max', 'count'],
  // Sub-metrics by gRPC status show in the summary only when a threshold names them.
  thresholds: {
    'grpc_req_duration{status:0}': ['max>=0'],
    'grpc_req_duration{status:8}': ['max>=0'],
  },
};

const client = new grpc.Client();
client.load([PROTOS], 'apdispatch/common/protocol/dispatcher.proto');

const outcome = {
  ok: new Counter('outcome_ok'),
  ok_after_deadline: new Counter('outcome_ok_after_deadline'),
  late: new Counter('outcome_late'),
  inaccurate: new Counter('outcome_inaccurate'),
  rejected: new Counter('outcome_rejected'),
  failed: new Counter('outcome_failed'),
};
const okMs = new Trend('ok_ms', true);

// digits: one 1x10x10 FP32 sample of zeros, base64.
const ZEROS = 'A'.repeat(Math.ceil((400 * 4) / 3 / 4) * 4 - 2) + '==';
const REQUEST = {
  task: 'digits',
  inputs: [{ name: 'input', datatype: 'FP32', shape: [1, 1, 10, 10], data: ZEROS }],
  sla: { deadline_ms: DEADLINE_MS, min_accuracy: 0 },
  app: 'k6',
};

export default function () {
  if (__ITER === 0) {
    client.connect(AP, { plaintext: true, timeout: '10s' });
  }
  const t0 = Date.now();
  const res = client.invoke('apdispatch.v1.Dispatcher/Infer', REQUEST, { timeout: '10s' });
  const ms = Date.now() - t0;
  if (res.status === grpc.StatusOK) {
    const what = res.message.outcome;
    if (what === 'OK') {
      if (ms <= DEADLINE_MS) {
        outcome.ok.add(1);
        okMs.add(ms);
      } else {
        outcome.ok_after_deadline.add(1);
      }
    } else if (what === 'LATE') {
      outcome.late.add(1);
    } else if (what === 'INACCURATE') {
      outcome.inaccurate.add(1);
    } else {
      outcome.failed.add(1);
    }
  } else if (res.status === grpc.StatusResourceExhausted) {
    outcome.rejected.add(1);
  } else {
    outcome.failed.add(1);
  }
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
