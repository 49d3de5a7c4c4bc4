// A scenario's apps as k6 load on the AP's Dispatcher (unary Infer), for
// `apdispatch k6`: one arrival-rate scenario per app, at the rate the
// scenario's load plan offers second by second, each request with its app's
// SLA. Environment: PLAN, the JSON file apdispatch/tools/k6load.py writes (apps,
// SLAs, rates per second, input samples); AP, host:port; PROTOS, the protos/
// folder; SUMMARY, where the summary JSON goes. Standalone:
//   apdispatch k6 SCENARIO --plan-only plan.json
//   k6 run -e PLAN=$PWD/plan.json -e AP=127.0.0.1:50051 -e PROTOS=$PWD/protos \
//     -e SUMMARY=summary.json apdispatch/tools/k6/scenario.js
import grpc from 'k6/net/grpc';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Counter } from 'k6/metrics';

// Parsed once, shared by every virtual user.
const PLAN = new SharedArray('plan', () => [JSON.parse(open(__ENV.PLAN))])[0];
const OUTCOMES = ['ok', 'late', 'inaccurate', 'rejected', 'failed'];

const scenarios = {};
// Sub-metrics show in the summary only when a threshold names them.
const thresholds = {};
PLAN.apps.forEach((app, i) => {
  // A step per second: a zero-length stage jumps to the second's rate, a
  // one-second stage holds it.
  const stages = [];
  app.rates.forEach((r) => {
    stages.push({ target: r, duration: '0s' }, { target: r, duration: '1s' });
  });
  scenarios[`app${i}`] = {
    executor: 'ramping-arrival-rate',
    startRate: app.rates[0],
    timeUnit: '1s',
    preAllocatedVUs: app.vus,
    maxVUs: app.max_vus,
    stages,
  };
  thresholds[`grpc_req_duration{scenario:app${i},status:0}`] = ['max>=0'];
  thresholds[`dropped_iterations{scenario:app${i}}`] = ['count>=0'];
});
thresholds['grpc_req_duration{status:0}'] = ['max>=0'];

export const options = {
  scenarios,
  thresholds,
  summaryTrendStats: ['med', 'p(99)', 'max', 'count'],
};

// Per app: queries sent and one counter per outcome.
const sent = PLAN.apps.map((_, i) => new Counter(`app${i}_sent`));
const outcome = PLAN.apps.map((_, i) => {
  const byName = {};
  OUTCOMES.forEach((o) => {
    byName[o] = new Counter(`app${i}_${o}`);
  });
  return byName;
});

const client = new grpc.Client();
client.load([__ENV.PROTOS], 'apdispatch/common/protocol/dispatcher.proto');
let connected = false;

export default function () {
  if (!connected) {
    client.connect(__ENV.AP, { plaintext: true, timeout: '10s' });
    connected = true;
  }
  const i = Number(exec.scenario.name.slice(3));
  const app = PLAN.apps[i];
  const samples = PLAN.inputs[app.task];
  const n = exec.scenario.iterationInTest;
  const request = {
    task: app.task,
    inputs: [samples[n % samples.length]],
    sla: { deadline_ms: app.deadline_ms, min_accuracy: app.min_accuracy },
    app: app.name,
    request_id: `k6-${i}-${n}`,
  };
  sent[i].add(1);
  // The AP answers by the deadline; the grace covers a reply on its way back.
  const res = client.invoke('apdispatch.v1.Dispatcher/Infer', request, {
    timeout: `${Math.ceil(app.deadline_ms + PLAN.grace_ms)}ms`,
  });
  if (res.status === grpc.StatusOK) {
    const what = String(res.message.outcome).toLowerCase();
    outcome[i][OUTCOMES.includes(what) ? what : 'failed'].add(1);
  } else if (res.status === grpc.StatusResourceExhausted) {
    outcome[i].rejected.add(1);
  } else {
    outcome[i].failed.add(1);
  }
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
