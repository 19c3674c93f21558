// Score one (prompt, response) pair with the RewardService, straight from protos/.
// Usage: node score.js HOST:PORT PROMPT RESPONSE [MODEL]
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync(path.join(PROTO_ROOT, "rlhf_mesh/v1/reward.proto"), {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  defaults: true,
});
const { RewardService } = grpc.loadPackageDefinition(definition).rlhf_mesh.v1;

const [address, prompt, response, model = ""] = process.argv.slice(2);
if (!address || response === undefined) {
  console.error("usage: node score.js HOST:PORT PROMPT RESPONSE [MODEL]");
  process.exit(2);
}

const client = new RewardService(address, grpc.credentials.createInsecure());
const deadline = new Date(Date.now() + 30_000); // every call has a deadline
client.Score({ model, samples: [{ text: { prompt, response } }] }, { deadline }, (err, reply) => {
  if (err) {
    console.error(`Score failed: ${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  }
  const [result] = reply.results;
  console.log(JSON.stringify({ model: reply.model, score: result.score, truncated: result.truncated,
    model_version: result.model_version }));
  client.close();
});
