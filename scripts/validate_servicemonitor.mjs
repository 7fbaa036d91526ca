#!/usr/bin/env node
// Validates Prometheus Operator ServiceMonitor documents with the models of the npm package
// @kubernetes-models/prometheus-operator (generated from the operator's Go API types, the same
// types controller-gen turns into the ServiceMonitor CRD). Driven by scripts/validate_deploy.py;
// the packages are installed by scripts/validate-deploy.sh into target/deploy-npm.
//
//   node scripts/validate_servicemonitor.mjs NPM_DIR < documents.json > result.json
//
// NPM_DIR is the directory whose node_modules holds the pinned packages; stdin is a JSON array
// of ServiceMonitor documents. Two layers, both from the package:
//
//   schema  the package's compiled JSON-schema validator (ServiceMonitor#validate(): types,
//           enums, patterns, required fields). It does not reject unknown fields: the package's
//           schemas carry no additionalProperties: false.
//   types   a TypeScript (pinned typescript package) type check of each document as an object
//           literal of the package's IServiceMonitor interface: excess-property checks reject
//           unknown fields at every level (metadata, spec, endpoints, relabelings, ...), and
//           wrong types and enum values fail too.
//
// Self-tests run on a fixed valid ServiceMonitor: it must be accepted, and each broken copy
// (unknown field at the top level, in metadata, spec, an endpoint and the selector, a wrong type,
// a bad enum, a bad duration, no selector) must be rejected, so that a validator that accepts
// everything fails the run. Output (stdout, JSON):
//   {"validator": "...", "documents": [{"index", "name", "errors": [...]}],
//    "selftests": [{"name", "expect": "accept"|"reject", "errors": [...], "ok"}]}
// Exit status 0 whenever the result was written (validate_deploy.py judges it), 2 on misuse.

import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const PKG = "@kubernetes-models/prometheus-operator";

function usage(msg) {
    process.stderr.write(`${msg}\nusage: node validate_servicemonitor.mjs NPM_DIR < documents.json\n`);
    process.exit(2);
}

const npmDir = process.argv[2];
if (!npmDir) usage("missing NPM_DIR");
const modules = path.resolve(npmDir, "node_modules");
const pkgDir = path.join(modules, PKG);
if (!fs.existsSync(path.join(pkgDir, "package.json"))) usage(`${PKG} is not installed in ${modules}`);
const pkgVersion = JSON.parse(fs.readFileSync(path.join(pkgDir, "package.json"), "utf8")).version;

const { ServiceMonitor } = await import(pathToFileURL(path.join(pkgDir, "monitoring.coreos.com/v1/ServiceMonitor.js")).href);
const ts = createRequire(path.join(modules, "x.js"))("typescript");

const docs = JSON.parse(fs.readFileSync(0, "utf8"));
if (!Array.isArray(docs)) usage("stdin must be a JSON array of ServiceMonitor documents");

// ---- layer 1: the package's compiled JSON-schema validator -----------------------------------
function schemaErrors(doc) {
    try {
        new ServiceMonitor(structuredClone(doc)).validate();
        return [];
    } catch (e) {
        const errs = e && Array.isArray(e.errors) ? e.errors : null;
        if (errs && errs.length) {
            return errs.map((x) => `schema: ${x.instancePath || "/"} ${x.message}${x.params && x.params.allowedValues ? ` (${x.params.allowedValues.join(", ")})` : ""}`);
        }
        return [`schema: ${String((e && e.message) || e).split("\n").join("; ")}`];
    }
}

// ---- layer 2: TypeScript check against IServiceMonitor (unknown fields) ------------------------
// All documents (and self-test cases) go into one program: one file per document under a
// temporary directory inside NPM_DIR, so that module resolution finds node_modules.
function typeErrors(items) {
    const dir = fs.mkdtempSync(path.join(path.resolve(npmDir), "check-"));
    try {
        const files = items.map((doc, i) => {
            const file = path.join(dir, `doc${i}.ts`);
            const text =
                `import type { IServiceMonitor } from "${PKG}/monitoring.coreos.com/v1/ServiceMonitor";\n` +
                `export const doc: IServiceMonitor = ${JSON.stringify(doc, null, 2)};\n`;
            fs.writeFileSync(file, text);
            return { file, lines: text.split("\n") };
        });
        const program = ts.createProgram(
            files.map((f) => f.file),
            {
                strict: true,
                noEmit: true,
                skipLibCheck: true,
                types: [],
                target: ts.ScriptTarget.ES2022,
                module: ts.ModuleKind.ESNext,
                moduleResolution: ts.ModuleResolutionKind.Bundler,
            },
        );
        const out = items.map(() => []);
        const all = ts.getPreEmitDiagnostics(program);
        for (const d of all) {
            const msg = ts.flattenDiagnosticMessageText(d.messageText, "; ");
            const i = d.file ? files.findIndex((f) => path.resolve(f.file) === path.resolve(d.file.fileName)) : -1;
            if (i < 0) {
                // A problem outside the documents (the package's typings, module resolution): every
                // document fails with it rather than passing unchecked.
                out.forEach((o) => o.push(`types: ${msg}`));
                continue;
            }
            const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
            out[i].push(`types: line ${line + 1} \`${files[i].lines[line].trim()}\`: ${msg}`);
        }
        return out;
    } finally {
        fs.rmSync(dir, { recursive: true, force: true });
    }
}

// ---- self-tests -------------------------------------------------------------------------------
// A fixed, valid ServiceMonitor with the fields kvshare uses (the real documents are checked on
// their own above): the self-tests do not depend on the deployment being valid.
const sample = {
    apiVersion: "monitoring.coreos.com/v1",
    kind: "ServiceMonitor",
    metadata: { name: "selftest", namespace: "selftest", labels: { "app.kubernetes.io/name": "selftest" } },
    spec: {
        jobLabel: "app.kubernetes.io/name",
        selector: { matchLabels: { "app.kubernetes.io/name": "selftest" } },
        endpoints: [{ port: "http", path: "/metrics", scheme: "http", interval: "15s", scrapeTimeout: "10s" }],
    },
};
const mutate = (f) => {
    const d = structuredClone(sample);
    f(d);
    return d;
};
const selftests = [
    ["a valid ServiceMonitor", "accept", mutate(() => {})],
    ["unknown top-level field (specs)", "reject", mutate((d) => { d.specs = {}; })],
    ["unknown metadata field (lables)", "reject", mutate((d) => { d.metadata.lables = { a: "b" }; })],
    ["unknown spec field (endpoint)", "reject", mutate((d) => { d.spec.endpoint = d.spec.endpoints; })],
    ["unknown endpoint field (scrapeInterval)", "reject", mutate((d) => { d.spec.endpoints[0].scrapeInterval = "15s"; })],
    ["unknown selector field (matchLabel)", "reject", mutate((d) => { d.spec.selector.matchLabel = { a: "b" }; })],
    ["wrong type (endpoint port 8080 as a number)", "reject", mutate((d) => { d.spec.endpoints[0].port = 8080; })],
    ["bad enum (endpoint scheme ftp)", "reject", mutate((d) => { d.spec.endpoints[0].scheme = "ftp"; })],
    ["bad duration (interval \"15 seconds\")", "reject", mutate((d) => { d.spec.endpoints[0].interval = "15 seconds"; })],
    ["missing spec.selector", "reject", mutate((d) => { delete d.spec.selector; })],
];

const all = [...docs, ...selftests.map((t) => t[2])];
const typed = typeErrors(all);
const errorsOf = (i) => [...schemaErrors(all[i]), ...typed[i]];

const tsVersion = ts.version;
const result = {
    validator: `${PKG}@${pkgVersion} schema + typescript@${tsVersion} types`,
    documents: docs.map((d, i) => ({ index: i, name: d?.metadata?.name ?? null, errors: errorsOf(i) })),
    selftests: selftests.map(([name, expect], j) => {
        const errors = errorsOf(docs.length + j);
        return { name, expect, errors, ok: expect === "accept" ? errors.length === 0 : errors.length > 0 };
    }),
};
process.stdout.write(JSON.stringify(result, null, 2) + "\n");
