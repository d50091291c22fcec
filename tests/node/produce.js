// Enqueue vbs.delete_backups tasks with celery-node (Celery protocol 2, JSON), without any vbs-deleter code.
// Usage: node produce.js REDIS_URL QUEUE PROJECT_ID BACKUP_ID [BACKUP_ID ...]
"use strict";
const celery = require("celery-node");

async function main() {
  const [redisUrl, queue, projectId, ...backupIds] = process.argv.slice(2);
  const client = celery.createClient(redisUrl, redisUrl, queue);
  await client.isReady();
  for (let start = 0; start < backupIds.length; start += 1000) {
    // our tasks take keyword arguments only: args is an empty list
    client.sendTask("vbs.delete_backups", [], {
      project_id: projectId,
      backup_ids: backupIds.slice(start, start + 1000),
      request_id: "celery-node-test",
    });
  }
  await client.isReady(); // sendTask publishes once the broker is ready: let those pushes go first
  await client.disconnect(); // QUIT after the queued LPUSHes
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
