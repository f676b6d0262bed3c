// A service in another language calling DiffusionService: @grpc/grpc-js with the proto loaded at run time.
//   node client.mjs <host:port> <proto path>
// Calls Generate and GenerateStream with a deadline and `x-tier` metadata, then the errors a client must
// handle (an unknown tier: INVALID_ARGUMENT; a deadline that cannot be met: DEADLINE_EXCEEDED), and prints
// one JSON object with what it saw.
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [target, protoPath] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, { keepCase: true, longs: Number, defaults: true, oneofs: true });
const { DiffusionService } = grpc.loadPackageDefinition(definition).diffusiongemma.v1;
const client = new DiffusionService(target, grpc.credentials.createInsecure());

const deadline = (seconds) => new Date(Date.now() + seconds * 1000);
const metadata = (tier) => {
  const m = new grpc.Metadata();
  m.set("application", "diffusiongemma");
  m.set("x-tier", tier);
  return m;
};

const unary = (request, tier, seconds) =>
  new Promise((resolve) =>
    client.Generate(request, metadata(tier), { deadline: deadline(seconds) }, (error, reply) =>
      resolve(error ? { code: grpc.status[error.code], details: error.details } : { code: "OK", reply }),
    ),
  );

const stream = (request, tier, seconds) =>
  new Promise((resolve) => {
    const chunks = [];
    const call = client.GenerateStream(request, metadata(tier), { deadline: deadline(seconds) });
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", (error) => resolve({ code: grpc.status[error.code], details: error.details, chunks }));
    call.on("end", () => resolve({ code: "OK", chunks }));
  });

const out = {};
out.unary = await unary({ text: "reverse: a b c d", seed: 3 }, "fast", 60);
const streamed = await stream({ text: "reverse: a b c d", seed: 3 }, "fast", 60);
out.stream = {
  code: streamed.code,
  text: streamed.chunks.filter((c) => c.kind === "canvas").map((c) => c.canvas.text).join(""),
  final: streamed.chunks.filter((c) => c.kind === "final").map((c) => c.final)[0] ?? null,
};
out.bad_tier = await unary({ text: "hi" }, "no-such-tier", 30);
const long = { text: "Tell me about the sea.", max_new_tokens: 256, sampler: { adaptive_stop: false, max_denoising_steps: 48 } };
out.deadline = await stream(long, "quality", 0.3);
delete out.deadline.chunks;
console.log(JSON.stringify(out));
client.close();
