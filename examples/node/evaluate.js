// Evaluate CIoU over gRPC from Node.js, using nothing but proto/lossd/v1/lossd.proto.
//
//   node evaluate.js [host:port]          (default 127.0.0.1:50051)
//
// Prints {"loss": [...], "grad": [[...], ...], "metric": [[...]], "error": {...}} as JSON.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "lossd", "v1", "lossd.proto");
const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true });
const lossd = grpc.loadPackageDefinition(definition).lossd.v1;

// Raw tensors are little-endian, row-major bytes plus a shape and a dtype.
function tensor(rows) {
  const flat = Float32Array.from(rows.flat());
  const raw = Buffer.alloc(flat.length * 4);
  flat.forEach((v, i) => raw.writeFloatLE(v, i * 4));
  return { shape: [rows.length, rows[0].length], dtype: "DTYPE_FLOAT32", raw };
}

// A Buffer's byteOffset may be unaligned, so read values rather than viewing it as a Float32Array.
function rows(t) {
  const values = [];
  for (let i = 0; i < t.raw.length; i += 4) values.push(t.raw.readFloatLE(i));
  if (t.shape.length < 2) return values;
  const width = Number(t.shape[1]);
  const out = [];
  for (let i = 0; i < values.length; i += width) out.push(values.slice(i, i + width));
  return out;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => client[method](request, { deadline: Date.now() + 10000 },
    (err, resp) => (err ? reject(err) : resolve(resp))));
}

async function main() {
  const target = process.argv[2] || "127.0.0.1:50051";
  const client = new lossd.LossService(target, grpc.credentials.createInsecure());
  const pred = [[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]];
  const gt = [[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]];

  const evaluated = await call(client, "Evaluate", {
    loss: "ciou", pred: tensor(pred), target: tensor(gt), box_format: "xyxy",
    params: { eps: { number: 1e-7 } },
  });
  const metric = await call(client, "Metric", { metric: "iou", boxes1: tensor(pred), boxes2: tensor(gt),
    pairwise: true });

  // a bad box comes back as INVALID_ARGUMENT with the engine's code in the trailing metadata
  let error = null;
  try {
    await call(client, "Evaluate", { loss: "giou", pred: tensor([[3, 0, 1, 1]]), target: tensor([[0, 0, 1, 1]]) });
  } catch (err) {
    error = { status: grpc.status[err.code], code: err.metadata.get("lossd-error-code")[0], details: err.details };
  }
  client.close();
  console.log(JSON.stringify({ loss: rows(evaluated.loss), grad: rows(evaluated.grad), metric: rows(metric.values),
    error }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
